"""The load and faults campaign: a real server on loopback over a local Ray pool, many concurrent
clients, and (faults phase) workers killed under them. Every request is checked against a dense
reference of its prompt; the campaign counts what ended how and what was lost.

    python -m tests.reliability.campaign --full           # the run RELIABILITY.md reports
    python -m tests.reliability.campaign --requests 200 --clients 16 --kills 3

Load phase: `requests` from `clients` threads, mixed prompt lengths, KV return modes (none,
handle, inline) and logits, with `max_pending_tokens` low enough that some are refused. Each
ends OK with the right result (request id, token count, last-token logits and KV against the
reference, every handle fetched and released) or RESOURCE_EXHAUSTED. Some clients cancel after
`accepted` or after progress, miss short deadlines, abandon a FetchKV, or keep a 1 s lease
without releasing it (it must expire). Worker and server memory after the phase are compared
with the level after warm-up.

Faults phase: the same mix while `kills` workers are killed at random moments (Ray restarts a
worker up to three times; the server replaces one that is gone for good). UNAVAILABLE and
FAILED_PRECONDITION (KV lost with its worker) are then clear answers too; after every kill the
pool must come back (health SERVING, every worker answering).

Losses: a request that got no status within its deadline, a wrong result, an unexpected status,
or anything left behind at the end (KV, leases, running prefills, fetches, reservations).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

OK = "OK"
# statuses a request may end with, beyond OK, by what its client did
_EXPECTED = {
    "complete": {"RESOURCE_EXHAUSTED"},
    "cancel_accepted": {"CANCELLED", "RESOURCE_EXHAUSTED"},
    "cancel_progress": {"CANCELLED", "RESOURCE_EXHAUSTED"},
    "short_deadline": {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
    "abandon_fetch": {"RESOURCE_EXHAUSTED"},
    "keep_lease": {"RESOURCE_EXHAUSTED"},
}
# a lost worker: UNAVAILABLE (retry), FAILED_PRECONDITION (its KV is gone); a restarted front end:
# CANCELLED (in flight when it stopped), NOT_FOUND (a handle of the old one)
_FAULT_STATUSES = {"UNAVAILABLE", "FAILED_PRECONDITION", "CANCELLED", "NOT_FOUND"}
_ACTION_WEIGHTS = {
    "complete": 70,
    "cancel_accepted": 6,
    "cancel_progress": 6,
    "short_deadline": 6,
    "abandon_fetch": 6,
    "keep_lease": 6,
}
TOLERANCE = 2e-3  # max |difference| of logits and keys from the dense reference (float32 CPU)


@dataclass
class CampaignConfig:
    requests: int = 200  # load phase
    clients: int = 16
    fault_requests: int = 200  # faults phase
    kills: int = 3
    front_end_restarts: int = 1
    workers: int = 2
    load_rounds: int = 4
    model: str | None = None  # HF directory; None = the embedded SmolLM2
    prompt_lengths: tuple = (16, 60, 200, 500, 900)
    max_pending_tokens: int = 12000  # low: part of the load is refused
    deadline_seconds: float = 120.0
    seed: int = 0


@dataclass
class RequestSpec:
    index: int
    prompt: int  # index into the campaign's prompts
    kv: str  # none | handle | inline
    logits: str  # last | none
    action: str  # a key of _EXPECTED

    @property
    def request_id(self) -> str:
        return f"campaign-{self.index}"


@dataclass
class Outcome:
    spec: RequestSpec
    status: str
    seconds: float
    problem: str = ""  # why the result is wrong, or empty


@dataclass
class Reference:
    token_ids: list
    logits: np.ndarray  # float32 [vocab], the last position
    last_keys: np.ndarray  # the last layer's keys [Hkv, N, d]


@dataclass
class Snapshot:
    """Memory and what is held, at one moment."""

    server_rss_mb: float
    worker_rss_mb: list
    worker_threads: list
    held: dict  # what must be zero when idle


@dataclass
class PhaseReport:
    name: str
    requests: int
    clients: int
    seconds: float
    statuses: dict
    by_action: dict
    latency_ok_s: dict
    losses: list
    kills: int = 0
    front_end_restarts: int = 0
    recoveries_s: list = field(default_factory=list)
    health_during_kills: dict = field(default_factory=dict)
    before: Snapshot | None = None
    after: Snapshot | None = None
    rounds: list = field(default_factory=list)  # Snapshot after each round (load)
    latencies_ok_s: list = field(default_factory=list)  # completed requests, for the percentiles


def make_prompts(config: CampaignConfig, vocab_size: int) -> list[list[int]]:
    rng = random.Random(config.seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for length in config.prompt_lengths]


def dense_references(model: str | None, prompts: list[list[int]]) -> list[Reference]:
    """Each prompt's last-token logits and last-layer keys from a dense prefill in this process."""
    from proxyprefill.workers.engine import PrefillEngine

    engine = PrefillEngine.from_pretrained(model, attention="dense", device="cpu")
    references = []
    for ids in prompts:
        result = engine.prefill(ids, chunk_size=8192, logits="last")
        references.append(
            Reference(ids, result.logits[0].numpy().copy(), result.keys[-1].float().numpy().copy())
        )
    return references


def make_specs(count: int, num_prompts: int, rng: random.Random, first_index: int) -> list[RequestSpec]:
    actions, weights = zip(*_ACTION_WEIGHTS.items(), strict=True)
    specs = []
    for offset in range(count):
        action = rng.choices(actions, weights)[0]
        kv = rng.choice(["none", "handle", "inline"])
        if action in ("abandon_fetch", "keep_lease"):
            kv = "handle"
        logits = rng.choice(["last", "none"])
        specs.append(RequestSpec(first_index + offset, rng.randrange(num_prompts), kv, logits, action))
    return specs


class Campaign:
    def __init__(self, config: CampaignConfig, service, pool, references: list[Reference]):
        self.config = config
        self.service = service
        self.pool = pool
        self.references = references
        self._rng = random.Random(config.seed + 1)
        self._next_index = 0

    def specs(self, count: int) -> list[RequestSpec]:
        specs = make_specs(count, len(self.references), self._rng, self._next_index)
        self._next_index += count
        return specs

    # one request ------------------------------------------------------------------------------
    def run_one(self, client, spec: RequestSpec) -> Outcome:
        started = time.monotonic()
        try:
            status, problem = self._request(client, spec)
        except grpc.RpcError as error:
            status, problem = error.code().name, "" if error.details() else "a status without a message"
        return Outcome(spec, status, time.monotonic() - started, problem)

    def _request(self, client, spec: RequestSpec) -> tuple[str, str]:
        """(status, problem) of one request, run as its action says."""
        reference = self.references[spec.prompt]
        options = dict(
            token_ids=reference.token_ids,
            kv=spec.kv,
            logits=spec.logits,
            request_id=spec.request_id,
            lease_seconds=1 if spec.action == "keep_lease" else 0,
        )
        deadline = self.config.deadline_seconds
        if spec.action in ("cancel_accepted", "cancel_progress"):
            after = "accepted" if spec.action == "cancel_accepted" else "progress"
            return self._cancel(client.prefill_events(client.request(**options), timeout=deadline), after), ""
        if spec.action == "short_deadline":
            deadline = self._rng.uniform(0.005, 0.3)
        outcome = client.prefill(**options, timeout=deadline)
        problem = self._check(spec, outcome.summary, outcome.logits, outcome.kv)
        if spec.kv != "handle" or problem or spec.action == "keep_lease":  # a kept lease must expire
            return OK, problem
        handle = outcome.handle.handle
        if spec.action == "abandon_fetch":  # read one piece, then go away
            stream = client.stub.FetchKV(_fetch_request(handle), timeout=deadline)
            next(stream)
            stream.cancel()
        else:
            problem = self._check(spec, outcome.summary, None, client.fetch_kv(handle, timeout=deadline))
        released = client.release(handle, timeout=deadline).released_bytes
        if released != outcome.handle.kv_bytes and not problem:
            problem = f"released {released} bytes of {outcome.handle.kv_bytes}"
        return OK, problem

    @staticmethod
    def _cancel(call, after: str) -> str:
        for event in call:
            if event.WhichOneof("event") == after:
                call.cancel()
                break
        return call.code().name

    def _check(self, spec: RequestSpec, summary, logits, kv) -> str:
        reference = self.references[spec.prompt]
        if summary.request_id != spec.request_id:
            return f"summary of {summary.request_id!r}"
        if summary.num_tokens != len(reference.token_ids):
            return f"{summary.num_tokens} tokens, sent {len(reference.token_ids)}"
        if logits is not None and spec.logits == "last":
            error = float(np.abs(logits[0].numpy() - reference.logits).max())
            if error > TOLERANCE:
                return f"logits differ from the reference by {error:.2e}"
        if kv is not None:
            if kv.header.num_tokens != len(reference.token_ids):
                return f"KV of {kv.header.num_tokens} tokens"
            error = float(np.abs(kv.keys[-1].float().numpy() - reference.last_keys).max())
            if error > TOLERANCE:
                return f"KV differs from the reference by {error:.2e}"
        return ""

    # phases -----------------------------------------------------------------------------------
    def run_phase(self, name: str, count: int, kills: int = 0, front_end_restarts: int = 0) -> PhaseReport:
        """`count` requests from `clients` threads; with faults, the clients go on past `count`
        until the last fault has been recovered from, so that every fault lands under load."""
        from proxyprefill.service.client import PrefillClient

        faults = kills + front_end_restarts
        report = PhaseReport(name, 0, self.config.clients, 0.0, {}, {}, {}, [], kills=kills)
        report.front_end_restarts = front_end_restarts
        injector = threading.Thread(target=self._inject_faults, args=(kills, front_end_restarts, report))
        lock = threading.Lock()
        specs: list[RequestSpec] = []

        def next_spec() -> RequestSpec | None:
            with lock:
                if len(specs) >= count and not (faults and injector.is_alive()):
                    return None
                specs.extend(self.specs(1))
                return specs[-1]

        def client_loop() -> list[Outcome]:
            outcomes = []
            with PrefillClient(self.service.target) as client:
                while (spec := next_spec()) is not None:
                    outcomes.append(self.run_one(client, spec))
            return outcomes

        started = time.monotonic()
        if faults:
            injector.start()
        with concurrent.futures.ThreadPoolExecutor(self.config.clients) as executor:
            loops = [executor.submit(client_loop) for _ in range(self.config.clients)]
            outcomes = [outcome for loop in loops for outcome in loop.result()]
        if faults:
            injector.join()
        report.seconds = time.monotonic() - started
        report.requests = len(specs)
        self._account(report, specs, outcomes, faults=faults > 0)
        return report

    def _account(self, report: PhaseReport, specs, outcomes: list[Outcome], faults: bool) -> None:
        report.statuses = dict(Counter(o.status for o in outcomes))
        report.by_action = {
            action: dict(Counter(o.status for o in outcomes if o.spec.action == action))
            for action in _EXPECTED
        }
        report.latencies_ok_s = [
            o.seconds for o in outcomes if o.status == OK and o.spec.action == "complete"
        ]
        report.latency_ok_s = percentiles(report.latencies_ok_s)
        allowed_faults = _FAULT_STATUSES if faults else set()
        for outcome in outcomes:
            expected = {OK} | _EXPECTED[outcome.spec.action] | allowed_faults
            late = outcome.seconds > self.config.deadline_seconds + 5
            if outcome.status not in expected or outcome.problem or late:
                report.losses.append(
                    f"{outcome.spec.request_id} ({outcome.spec.action}, kv={outcome.spec.kv}): "
                    f"{outcome.status} {outcome.problem} after {outcome.seconds:.1f} s"
                )
        if len(outcomes) != len(specs) or len({o.spec.request_id for o in outcomes}) != len(specs):
            report.losses.append("a request went missing or ran twice")

    # faults -----------------------------------------------------------------------------------
    def _inject_faults(self, kills: int, front_end_restarts: int, report: PhaseReport) -> None:
        """Kills a random worker at a random moment and waits until the pool has recovered,
        `kills` times; then restarts the front end `front_end_restarts` times."""
        import ray

        from proxyprefill.service.client import PrefillClient

        health = Counter()
        for _ in range(kills):
            time.sleep(self._rng.uniform(0.2, 2.0))
            worker = self._rng.randrange(len(self.pool.actors))
            before = ray.get(self.pool.actors[worker].ping.remote(), timeout=120)
            ray.kill(self.pool.actors[worker], no_restart=False)
            killed_at = time.monotonic()
            with PrefillClient(self.service.target) as client:
                recovered = self._wait_recovered(client, worker, before, health)
            if recovered:
                report.recoveries_s.append(round(time.monotonic() - killed_at, 2))
            else:
                report.losses.append(f"{self.pool.names[worker]} did not recover within 300 s")
        report.health_during_kills = dict(health)
        for _ in range(front_end_restarts):
            time.sleep(self._rng.uniform(0.5, 2.0))
            self._restart_front_end()

    def _restart_front_end(self) -> None:
        """Stops the server with no grace (in-flight calls are cancelled, leases freed) and starts
        a new one on the same port and pool; clients reconnect by themselves."""
        from proxyprefill.service.local import LocalService

        config = dataclasses.replace(self.service.config, listen=self.service.target)
        self.service.stop(grace=0)
        self.service = LocalService(config, pool=self.pool).start()

    def _wait_recovered(self, client, worker: int, before: str, health: Counter) -> bool:
        """Recovered: the worker answers with a new incarnation, the server routes to it again,
        and health says SERVING."""
        import ray

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = client.health(timeout=10)
            health[status] += 1
            try:
                now = ray.get(self.pool.actors[worker].ping.remote(), timeout=2)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                now = before
            server = self.service.server
            if now != before and server.admission.available(worker) and status == "SERVING":
                return True
            time.sleep(0.2)
        return False

    # what is held -----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        import ray

        from proxyprefill.workers.prefill_worker import resident_bytes

        stats = ray.get([self.pool.stats(i) for i in range(len(self.pool.actors))], timeout=120)
        server = self.service.server
        held = {
            "worker_kv_bytes": sum(s["kv_bytes"] for s in stats),
            "worker_handles": sum(s["handles"] for s in stats),
            "worker_running": sum(s["running"] for s in stats),
            "worker_fetching": sum(s["fetching"] for s in stats),
            "leases": len(server.leases),
            "lease_bytes": server.leases.held_bytes,
            "reserved_bytes": server.leases.reserved_bytes,
            "pending_tokens": server.admission.pending_tokens,
            "queued": server.admission.queue_depth,
        }
        return Snapshot(
            server_rss_mb=round(resident_bytes() / 2**20, 1),
            worker_rss_mb=[round(s["rss_bytes"] / 2**20, 1) for s in stats],
            worker_threads=[s["threads"] for s in stats],
            held=held,
        )

    def settle(self, seconds: float = 60.0) -> Snapshot:
        """Waits (kept leases expire) until nothing is held, or `seconds`; the last snapshot."""
        deadline = time.monotonic() + seconds
        while True:
            snapshot = self.snapshot()
            if not any(snapshot.held.values()) or time.monotonic() > deadline:
                return snapshot
            time.sleep(0.5)


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ordered = sorted(seconds)
    summary = {f"p{q}": round(float(np.percentile(ordered, q)), 4) for q in (50, 90, 99)}
    return summary | {"max": round(ordered[-1], 4), "count": len(ordered)}


def combine(name: str, rounds: list[PhaseReport]) -> PhaseReport:
    """One report of several rounds run one after the other (their snapshots in `rounds`)."""
    total = PhaseReport(name, 0, rounds[0].clients, 0.0, {}, {}, {}, [])
    for part in rounds:
        total.requests += part.requests
        total.seconds += part.seconds
        total.statuses = dict(Counter(total.statuses) + Counter(part.statuses))
        for action, counts in part.by_action.items():
            total.by_action[action] = dict(Counter(total.by_action.get(action, {})) + Counter(counts))
        total.losses += part.losses
        total.latencies_ok_s += part.latencies_ok_s
        total.rounds.append(part.after)
    total.latency_ok_s = percentiles(total.latencies_ok_s)
    total.after = rounds[-1].after
    return total


def _fetch_request(handle: str):
    from proxyprefill.protos import prefill_pb2 as pb

    return pb.FetchKVRequest(handle=handle, max_chunk_bytes=1024)


# the whole run --------------------------------------------------------------------------------
def run_campaign(config: CampaignConfig, warmup: int = 50) -> list[PhaseReport]:
    """Starts Ray, the pool and the server; warm-up, load phase, faults phase; stops them."""
    import ray

    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService
    from proxyprefill.workers.ray_pool import WorkerPool

    server_config = config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        model=config.model,
        num_workers=config.workers,
        max_pending_tokens=config.max_pending_tokens,
        log_level="WARNING",
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = WorkerPool.start(server_config.engine_kwargs(), num_workers=config.workers)
    try:
        prompts = make_prompts(config, pool.description.model.vocab_size)
        references = dense_references(config.model, prompts)
        campaign = Campaign(config, LocalService(server_config, pool=pool).start(), pool, references)
        try:
            campaign.run_phase("warm-up", warmup)
            before = campaign.settle()
            rounds = []
            for _ in range(config.load_rounds):  # memory after each round shows any growth
                rounds.append(campaign.run_phase("load", config.requests // config.load_rounds))
                rounds[-1].after = campaign.settle()
            load = combine("load", rounds)
            load.before = before
            faults = campaign.run_phase(
                "faults", config.fault_requests, config.kills, config.front_end_restarts
            )
            faults.after = campaign.settle()
        finally:
            campaign.service.stop()
        for phase in (load, faults):
            left = {name: value for name, value in phase.after.held.items() if value}
            if left:
                phase.losses.append(f"held after settling: {left}")
        return [load, faults]
    finally:
        pool.shutdown()
        ray.shutdown()


def memory_change(report: PhaseReport) -> dict:
    """Relative change of server and total worker RSS from after warm-up to after the phase."""
    before, after = report.before, report.after
    return {
        "server": round(after.server_rss_mb / before.server_rss_mb - 1, 4),
        "workers": round(sum(after.worker_rss_mb) / sum(before.worker_rss_mb) - 1, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the issue's sizes: 2000 requests from 64 clients, then 1000 more (at least) under "
        "20 worker kills and 3 front-end restarts (default: off)",
    )
    parser.add_argument("--requests", type=int, default=200, help="load-phase requests (default: 200)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument(
        "--fault-requests", type=int, default=200, help="faults-phase requests (default: 200)"
    )
    parser.add_argument("--kills", type=int, default=3, help="worker kills in the faults phase (default: 3)")
    parser.add_argument(
        "--front-end-restarts", type=int, default=1, help="server restarts in the faults phase (default: 1)"
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny random Llama of the tests instead of the embedded SmolLM2 (default: off)",
    )
    parser.add_argument("--json", help="also write the reports to this file (default: none)")
    args = parser.parse_args(argv)
    config = CampaignConfig(
        args.requests, args.clients, args.fault_requests, args.kills, args.front_end_restarts, args.workers
    )
    if args.full:
        config.requests, config.clients, config.fault_requests, config.kills = 2000, 64, 1000, 20
        config.front_end_restarts = 3
    with tempfile.TemporaryDirectory() as model_dir:
        if args.tiny:
            from tests._support import save_tiny_llama

            save_tiny_llama(model_dir, num_layers=4)
            config.model = model_dir
        reports = run_campaign(config)
    for report in reports:
        print(
            f"## {report.name}: {report.requests} requests, {report.clients} clients, {report.seconds:.0f} s"
        )
        print(f"statuses {report.statuses}")
        print(f"by action {report.by_action}")
        print(f"latency of completed requests (s) {report.latency_ok_s}")
        if report.kills:
            print(f"kills {report.kills}, recoveries (s) {report.recoveries_s}")
            print(f"front-end restarts {report.front_end_restarts}")
            print(f"health samples while recovering {report.health_during_kills}")
        if report.before is not None:
            print(f"memory before {asdict(report.before)}")
            for number, snapshot in enumerate(report.rounds, 1):
                print(f"after round {number}: {asdict(snapshot)}")
            print(f"change from warm-up to the end {memory_change(report)}")
        else:
            print(f"after {asdict(report.after)}")
        print(f"losses {len(report.losses)}: {report.losses[:20]}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) | {"latencies_ok_s": None} for r in reports], out, indent=1)
    return 0 if not any(r.losses for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
