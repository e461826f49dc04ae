"""The deployment files in docker/: parsed for real and held to the code.

Docker cannot run where the tests run, so these tests check what can be checked
without it: the compose file against the Compose specification's JSON schema and
the rules that matter here (start order, settings names, secrets, health checks),
the Dockerfiles with dockerfile-parse, and every command the images and services
run, through the real CLI's --help. The worker's health check is run against a
real Celery worker on Redis.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from worker.celery_app import QUEUES
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILES = {"api": DOCKER / "Dockerfile.api", "worker": DOCKER / "Dockerfile.worker"}
SETTING_NAMES = {f"SYNTHGUARD_{name.upper()}" for name in Settings.model_fields}
# Variables without which compose must refuse to start: none has a safe default.
REQUIRED_SECRETS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "SYNTHGUARD_SECRET_KEY"}
SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "pw",
    "MINIO_ROOT_USER": "minio",
    "MINIO_ROOT_PASSWORD": "minio-pw",
    # A well-formed Fernet key (32 bytes, url-safe base64), as the services get one.
    "SYNTHGUARD_SECRET_KEY": "dGVzdC1zZWNyZXQta2V5LWZvci1zeW50aGd1YXJkLTE=",
}
# The processes that use the schema, and so must start after the migration.
SCHEMA_USERS = ("api", "worker", "beat")


# --------------------------------------------------------------- interpolation


class MissingVariable(Exception):
    pass


_TOKEN = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.DOTALL)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+r}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        if match.group(3):
            return env.get(match.group(3), "")
        braced = _BRACED.fullmatch(match.group(2))
        assert braced, f"malformed interpolation ${{{match.group(2)}}}"
        name, op, arg = braced.groups()
        unset = name not in env
        empty = unset or env[name] == ""
        if op is None:
            return env.get(name, "")
        missing = empty if op.startswith(":") else unset
        if op.endswith("-"):
            return arg if missing else env[name]
        if op.endswith("?"):
            if missing:
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        return "" if missing else arg  # ":+" and "+"

    return _TOKEN.sub(substitute, value)


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("a$$b ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+r}", env) == "a$b x x d d  r"
    )
    with pytest.raises(MissingVariable, match="EMPTY: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?fine}", env) == ""


# ------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw_compose, SAMPLE_ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # the short form means service_started
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _compose_schema() -> dict[str, Any]:
    try:
        from importlib.resources import files

        text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("the Compose specification's schema comes with check-jsonschema, which is not installed")
    return json.loads(text)


@pytest.mark.parametrize("interpolated", [False, True], ids=["as-written", "interpolated"])
def test_compose_file_matches_the_compose_specification(
    raw_compose: dict[str, Any], compose: dict[str, Any], interpolated: bool
) -> None:
    import jsonschema

    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose if interpolated else raw_compose), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_required_secrets_fail_fast(raw_compose: dict[str, Any]) -> None:
    for name in REQUIRED_SECRETS:
        env = {k: v for k, v in SAMPLE_ENV.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            interpolate(raw_compose, env)
        with pytest.raises(MissingVariable, match=name):
            interpolate(raw_compose, {**env, name: ""})


def test_no_secret_is_hard_coded(raw_compose: dict[str, Any]) -> None:
    secretive = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|ROOT_USER")
    required = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}$")
    for name, service in raw_compose["services"].items():
        for key, value in _environment(service).items():
            if secretive.search(key):
                assert required.match(value), f"{name}: {key} must be ${{VAR:?message}}, not {value!r}"
            for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
                assert required.match(password), f"{name}: {key} carries a password that is not ${{VAR:?...}}"


def test_depends_on_targets_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target in _depends_on(service):
            assert target in services, f"{name} depends on unknown service {target}"


def test_migration_runs_first_once_the_database_is_healthy(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate.get("restart") == "no"
    assert _depends_on(migrate)["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["healthcheck"]["test"]
    for name in SCHEMA_USERS:
        deps = _depends_on(services[name])
        assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", name


def test_bucket_is_created_before_the_processes_that_read_it(services: dict[str, dict[str, Any]]) -> None:
    script = " ".join(services["create-bucket"]["command"])
    assert "mc mb --ignore-existing" in script
    for name in ("api", "worker"):
        assert _depends_on(services[name])["create-bucket"]["condition"] == "service_completed_successfully"


def test_exactly_one_beat(services: dict[str, dict[str, Any]]) -> None:
    beats = [name for name, s in services.items() if s.get("command") == ["beat"]]
    assert beats == ["beat"]
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1


def test_worker_reserves_one_gpu_and_says_how_to_run_on_cpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "SYNTHGUARD_DEVICE=cpu" in COMPOSE_FILE.read_text(encoding="utf-8")


def test_every_lane_has_a_worker_and_realtime_one_of_its_own(services: dict[str, dict[str, Any]]) -> None:
    lanes: dict[str, set[str]] = {}
    for name, service in services.items():
        argv = service.get("command") or []
        if argv[:1] == ["worker"]:
            given = argv[argv.index("--queues") + 1] if "--queues" in argv else ",".join(QUEUES)
            lanes[name] = {queue.removeprefix("synthguard.") for queue in given.split(",")}
    assert set().union(*lanes.values()) == {q.removeprefix("synthguard.") for q in QUEUES}, lanes
    dedicated = [name for name, consumed in lanes.items() if "realtime" in consumed and "bulk" not in consumed]
    assert dedicated, f"no worker keeps realtime images away from a backfill: {lanes}"
    for name in dedicated:
        assert services[name]["image"] == services["worker"]["image"]
        assert services[name]["deploy"] == services["worker"]["deploy"], "the same GPU reservation"
        assert "inspect ping" in " ".join(services[name]["healthcheck"]["test"])


def test_model_weights_come_from_a_named_volume(compose: dict[str, Any]) -> None:
    assert "model-weights" in compose["volumes"]
    worker = compose["services"]["worker"]
    checkpoint = _environment(worker)["SYNTHGUARD_MODEL_CHECKPOINT"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in worker["volumes"]}
    mounted_at = [target for target in mounts if Path(checkpoint).is_relative_to(target)]
    assert mounted_at and mounts[mounted_at[0]] == "model-weights"
    assert all(m.endswith(":ro") for m in worker["volumes"]), "the worker only reads the weights"


def test_every_synthguard_variable_is_a_setting() -> None:
    """No invented knobs: every SYNTHGUARD_* name in the deployment files and docs exists in Settings."""
    paths = [COMPOSE_FILE, *DOCKERFILES.values(), ROOT / "docs" / "operations.md"]
    for path in paths:
        used = set(re.findall(r"SYNTHGUARD_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
        unknown = used - SETTING_NAMES
        assert not unknown, f"{path.relative_to(ROOT)}: not settings: {sorted(unknown)}"


def test_service_environments_use_only_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key in _environment(service):
            if key.startswith("SYNTHGUARD_"):
                assert key in SETTING_NAMES, f"{name}: {key}"
        if name in ("migrate", *SCHEMA_USERS):
            env = _environment(service)
            assert env["SYNTHGUARD_DATABASE_URL"].startswith("postgresql+psycopg://"), name
            assert env["SYNTHGUARD_BROKER_URL"].startswith("redis://redis:"), name
            Settings(
                **{
                    k.removeprefix("SYNTHGUARD_").lower(): v
                    for k, v in env.items()
                    if k.startswith("SYNTHGUARD_")
                }
            )


def test_builds_and_images_exist_and_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        else:
            image = service["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag, f"{name}: {image} has no tag"
            assert tag != "latest", f"{name}: {image}"


def test_health_checks_where_promised(services: dict[str, dict[str, Any]]) -> None:
    for name in ("postgres", "redis", "api", "worker"):
        check = services[name]["healthcheck"]
        assert check["test"] and not check.get("disable"), name
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "inspect ping" in " ".join(services["worker"]["healthcheck"]["test"])


# --------------------------------------------------------------- Dockerfiles


def _parse(path: Path) -> list[dict[str, Any]]:
    # From a copy in memory: given a path, dockerfile-parse wants a file named "Dockerfile".
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes())).structure


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


def _dockerignored() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _parse(DOCKERFILES[request.param])


def test_base_image_is_pinned(dockerfile: tuple[str, list[dict[str, Any]]]) -> None:
    _, structure = dockerfile
    # The base is a build argument (docker/smoke.sh passes a stand-in); its default must be pinned.
    defaults = dict(i["value"].split("=", 1) for i in structure if i["instruction"] == "ARG" and "=" in i["value"])
    for base in (i["value"].split()[0] for i in structure if i["instruction"] == "FROM"):
        base = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), base)
        _, sep, tag = base.rpartition(":")
        assert sep and tag and tag != "latest" and "$" not in base, base


def test_runs_as_a_non_root_user(dockerfile: tuple[str, list[dict[str, Any]]]) -> None:
    _, structure = dockerfile
    instructions = [i["instruction"] for i in structure]
    users = [i["value"].split(":")[0] for i in structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(n for n, i in enumerate(instructions) if i == "USER")
    for command in ("ENTRYPOINT", "CMD"):
        assert instructions.index(command) > last_user, f"{command} before USER"


def test_has_a_health_check(dockerfile: tuple[str, list[dict[str, Any]]]) -> None:
    _, structure = dockerfile
    checks = [i["value"] for i in structure if i["instruction"] == "HEALTHCHECK"]
    assert len(checks) == 1 and "CMD" in checks[0]


def test_adds_nothing_remote_and_copies_what_exists(dockerfile: tuple[str, list[dict[str, Any]]]) -> None:
    _, structure = dockerfile
    ignored = _dockerignored()
    for item in structure:
        if item["instruction"] == "ADD":
            assert not re.search(r"\b(https?|git)://|git@", item["value"]), item["content"]
        if item["instruction"] in ("ADD", "COPY"):
            if "--from=" in item["value"]:
                continue  # from a build stage of the same file, not the context
            *sources, _ = [p for p in shlex.split(item["value"]) if not p.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"


def test_pip_installs_are_pinned_by_pyproject(dockerfile: tuple[str, list[dict[str, Any]]]) -> None:
    _, structure = dockerfile
    takes_value = {
        "-r", "--requirement", "--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-f", "--find-links"
    }  # fmt: skip
    installs = 0
    for item in structure:
        if item["instruction"] != "RUN":
            continue
        for step in re.split(r"&&|;", item["value"]):
            words = shlex.split(step)
            if words[:2] != ["pip", "install"]:
                continue
            installs += 1
            args = words[2:]
            packages = [
                a
                for n, a in enumerate(args)
                if not a.startswith("-") and (n == 0 or args[n - 1] not in takes_value)
            ]
            assert packages in ([], ["."]), f"install from pyproject.toml, not by name: {step.strip()}"
            if packages == ["."]:
                assert "--no-deps" in args, "the dependencies were installed, pinned, in the layer before"
    assert installs >= 2


def test_requirements_script_carries_pyproject_pins() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]

    def run(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(DOCKER / "requirements.py"), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.splitlines()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    model = project["optional-dependencies"]["model"]
    torch = run("--extra", "model", "--only", "torch", "torchvision")
    assert torch == ["torch==2.14.1", "torchvision==0.29.1"]
    assert sorted(torch + run("--extra", "model", "--exclude", "torch", "torchvision")) == sorted(deps + model)
    assert run() == deps  # the slim install: no model stack
    for wrong in (["--only", "torch", "no-such-package"], ["--extra", "no-such-extra"]):
        missing = subprocess.run(
            [sys.executable, str(DOCKER / "requirements.py"), "--extra", "model", *wrong], cwd=ROOT, capture_output=True
        )
        assert missing.returncode != 0, wrong


def test_the_api_image_installs_no_model_stack_and_the_worker_image_does() -> None:
    from worker.cli._base import MODEL_STACK

    def requirement_steps(name: str) -> list[list[str]]:
        steps = []
        for item in _parse(DOCKERFILES[name]):
            if item["instruction"] == "RUN":
                steps += [shlex.split(step) for step in re.split(r"&&|;", item["value"]) if "requirements.py" in step]
        return steps

    api, worker = requirement_steps("api"), requirement_steps("worker")
    assert api and all("--extra" not in step for step in api)
    assert worker and all(step[step.index("--extra") + 1] == "model" for step in worker)

    def name_of(requirement: str) -> str:
        return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=~!; ]", requirement, maxsplit=1)[0]).lower()

    base = {name_of(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]}
    assert not base & {name_of(d) for d in MODEL_STACK.values()}, "the slim install would pull in the model stack"


def test_the_smoke_script_builds_and_runs_the_stack() -> None:
    """docker/smoke.sh, for real: minutes of image builds, so only when asked for."""
    if os.environ.get("SYNTHGUARD_TEST_DOCKER") != "1":
        pytest.skip("set SYNTHGUARD_TEST_DOCKER=1 (and DOCKER_HOST) to build the images and run the stack")
    done = subprocess.run(["bash", str(DOCKER / "smoke.sh")], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "signature verified" in done.stdout and "smoke passed" in done.stdout


# -------------------------------------------------------- commands, for real


def _image_command(name: str, override: list[str] | None = None) -> list[str]:
    structure = _parse(DOCKERFILES[name])
    entrypoint = next(_exec_form(i["value"]) for i in structure if i["instruction"] == "ENTRYPOINT")
    cmd = next(_exec_form(i["value"]) for i in structure if i["instruction"] == "CMD")
    return entrypoint + (override if override is not None else cmd)


def _commands_run(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    commands = {f"image {name}": _image_command(name) for name in DOCKERFILES}
    for name, service in services.items():
        build = service.get("build")
        if not build or "entrypoint" in service:
            continue
        image = "worker" if build["dockerfile"].endswith(".worker") else "api"
        commands[f"service {name}"] = _image_command(image, service.get("command"))
    return commands


def test_images_and_services_run_the_expected_commands(services: dict[str, dict[str, Any]]) -> None:
    commands = _commands_run(services)
    assert commands["image api"] == ["synthguard", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert commands["image worker"][:2] == ["synthguard", "worker"]
    assert commands["service api"] == commands["image api"]
    assert commands["service worker"] == commands["image worker"]
    assert commands["service migrate"] == ["synthguard", "db", "upgrade"]
    assert commands["service beat"] == ["synthguard", "beat"]


def test_every_command_run_exists_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    """The images' entrypoints run as plain commands: their options must parse (--help stops before running)."""
    top = subprocess.run(["synthguard", "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    for where, argv in _commands_run(services).items():
        assert argv[0] == "synthguard", where
        assert re.search(rf"^\s+{re.escape(argv[1])}\s", top.stdout, re.MULTILINE), (
            f"{where}: {argv[1]} not in --help"
        )
        result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{where}: {shlex.join(argv)}: {result.stderr}"
        for option in (a for a in argv if a.startswith("--")):
            assert option in result.stdout, f"{where}: {option}"


def test_api_health_check_asks_the_port_the_api_listens_on() -> None:
    structure = _parse(DOCKERFILES["api"])
    command = _image_command("api")
    port = command[command.index("--port") + 1]
    check = next(i["value"] for i in structure if i["instruction"] == "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/healthz" in check
    assert "EXPOSE" in {i["instruction"] for i in structure}


def _worker_health_check() -> str:
    check = next(i["value"] for i in _parse(DOCKERFILES["worker"]) if i["instruction"] == "HEALTHCHECK")
    return check.split(" CMD ", 1)[1]


def test_worker_health_check_fails_without_a_worker() -> None:
    env = {**os.environ, "SYNTHGUARD_BROKER_URL": _redis_url()}
    env.pop("PYTHONPATH", None)
    started = time.monotonic()
    result = subprocess.run(
        ["sh", "-c", _worker_health_check()], cwd=ROOT, env=env, timeout=60, capture_output=True
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 20, "the check must give up within the HEALTHCHECK timeout"


def _redis_url() -> str:
    return os.environ.get("SYNTHGUARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")


def test_worker_health_check_answers_for_a_live_worker(tmp_path: Path) -> None:
    """The check's --destination must match the node name the image's CMD gives the worker."""
    import redis

    url = _redis_url()
    try:
        redis.Redis.from_url(url).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis at {url}")
    command = _image_command("worker")
    hostname = command[command.index("--hostname") + 1]
    env = {**os.environ, "SYNTHGUARD_BROKER_URL": url}
    # A plain Celery worker of the same app, with the image's node name; it listens on
    # a queue nothing publishes to, so it takes no real work and needs no model.
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--pool=solo",
            f"--hostname={hostname}",
            "--queues=synthguard.deployment-test",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(
                ["sh", "-c", _worker_health_check()], cwd=ROOT, env=env, timeout=60, capture_output=True
            )
            if result.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_documented_compose_commands_name_real_services(services: dict[str, dict[str, Any]]) -> None:
    docs = [ROOT / "README.md", ROOT / "docs" / "operations.md"]
    # Shell line continuations joined first, so that each command is one line.
    texts = [re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8")) for path in docs]
    runs = [
        m for text in texts for m in re.findall(r"compose\.yaml(?: --profile \w+)? run --rm ([^`\n]*)", text)
    ]
    assert len(runs) >= 3
    for line in runs:
        words = shlex.split(line.split("#")[0])
        # Skip run's own options (and the values of -v and --entrypoint) to reach the service name.
        while words[0].startswith("-"):
            words = words[2:] if words[0] in ("-v", "--entrypoint") else words[1:]
        assert words[0] in services, line
    assert services["fetch-weights"]["volumes"] == ["model-weights:/models"], "the one writer of the weights"
