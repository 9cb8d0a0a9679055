"""When each chunk passed through each pipeline stage, and what that says about the pipeline:
per-stage utilisation, the bubble (idle fill and drain) against its ideal, bytes moved."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChunkRecord:
    """One chunk's pass through one stage (wall-clock seconds, comparable across processes)."""

    stage: int
    chunk: int
    start: float
    end: float
    bytes_in: int
    bytes_out: int
    wait: float = 0.0  # seconds spent waiting for the input (collective transport)


@dataclass
class PipelineTimeline:
    """Per-stage, per-chunk timestamps of one request and what they say about the pipeline.

    utilisation[s] = busy time of stage s / makespan; bubble = 1 - mean utilisation (the idle
    share of all stage-seconds); overlap = share of the makespan during which at least two
    stages computed at once; ideal_bubble = (S-1)/(C+S-1) for C equal chunks.
    """

    records: list[ChunkRecord]
    num_stages: int
    num_chunks: int

    @property
    def makespan(self) -> float:
        if not self.records:
            return 0.0
        return max(r.end for r in self.records) - min(r.start for r in self.records)

    def busy(self, stage: int) -> float:
        return sum(r.end - r.start for r in self.records if r.stage == stage)

    def utilisation(self) -> list[float]:
        span = self.makespan or 1.0
        return [self.busy(s) / span for s in range(self.num_stages)]

    def bubble(self) -> float:
        util = self.utilisation()
        return 1.0 - sum(util) / len(util)

    def ideal_bubble(self) -> float:
        return (self.num_stages - 1) / (self.num_chunks + self.num_stages - 1)

    def overlap(self) -> float:
        """Share of the makespan with two or more stages busy (sweep over interval ends)."""
        events = sorted([(r.start, 1) for r in self.records] + [(r.end, -1) for r in self.records])
        busy_stages, last, overlapped = 0, None, 0.0
        for t, delta in events:
            if last is not None and busy_stages >= 2:
                overlapped += t - last
            busy_stages += delta
            last = t
        return overlapped / (self.makespan or 1.0)

    def bytes_moved(self) -> int:
        """Bytes that crossed a process boundary: inputs of every stage plus the logits."""
        return sum(r.bytes_in for r in self.records) + sum(
            r.bytes_out for r in self.records if r.stage == self.num_stages - 1
        )

    def summary(self) -> dict:
        return {
            "stages": self.num_stages,
            "chunks": self.num_chunks,
            "makespan_s": self.makespan,
            "stage_busy_s": [self.busy(s) for s in range(self.num_stages)],
            "stage_utilisation": self.utilisation(),
            "bubble": self.bubble(),
            "ideal_bubble": self.ideal_bubble(),
            "overlap": self.overlap(),
            "bytes_moved": self.bytes_moved(),
        }
