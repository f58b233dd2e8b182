"""The driver's console under the embedded Ray: one progress bar and one line per link,
read from the run's ``metrics.jsonl`` (the workers' own output stays in Ray's logs).

:class:`Follower` polls the file in a thread. It shows a bar for the whole chain (steps,
link, loss, tokens/s, ETA) on an interactive terminal, and always prints each link's line
once, the warnings that mean something (a merge that kept too little, a resume after a
restart of the worker group), and the start-up summary. A restarted worker group rewrites
the file from its checkpoint; lines already shown are not shown again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from raclora_dist.config import RunConfig
from raclora_dist.observe.metrics import interactive, landed_warning, link_line, resize_line


class Follower(threading.Thread):
    """Follows ``RUN/metrics.jsonl`` until :meth:`stop`; prints through ``emit``."""

    def __init__(self, cfg: RunConfig, emit: Callable[[str], None] = print, poll_s: float = 0.5,
                 bar: bool | None = None) -> None:
        super().__init__(daemon=True, name="raclora-progress")
        self.cfg, self.emit, self.poll_s = cfg, emit, poll_s
        self.path = cfg.run.path / "metrics.jsonl"
        self._halt = threading.Event()
        self._offset = 0
        self._inode: int | None = None
        self._seen_links: set[int] = set()
        self._seen_resumes: set[tuple[str, int, int]] = set()
        self._shown_startup = False
        self.records: list[dict] = []
        self._last_link: dict | None = None  # the previous link record (a capped chain warns once)
        rc, tc = cfg.raclora, cfg.train
        self.total = rc.links * rc.steps_per_link
        self.tokens_per_link = tc.batch_size * tc.grad_accum * cfg.data.seq_len * rc.steps_per_link
        self.bar = None
        if bar if bar is not None else interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, leave=True)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.emit(line)

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        st = self.path.stat()
        if st.st_ino != self._inode or st.st_size < self._offset:  # rewritten from a checkpoint (a resumed run)
            self._inode, self._offset = st.st_ino, 0
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1  # whole lines only
        self._offset += cut
        return data[:cut].decode("utf-8", "replace").splitlines()

    def _handle(self, rec: dict) -> None:
        kind = rec.get("type")
        self.records.append(rec)
        if kind == "step" and self.bar is not None:
            self.bar.n = rec["step"]
            self.bar.set_postfix(link=rec["link"] + 1, loss=f"{rec['loss']:.3f}",
                                 tok_s=f"{rec['tokens_per_s']:.0f}", refresh=True)
        elif kind == "startup" and not self._shown_startup:
            self._shown_startup = True
            first = ", ".join(f"{p - s:,.0f}" for p, s in zip(rec["peak_rss_mb_first_step"], rec["rss_mb_start"], strict=False))
            self._print(f"loaded in {rec['load_s']:.1f} s, first step {rec['first_step_s']:.1f} s after start "
                        f"(peak RSS above start per rank: {first} MiB)")
        elif kind == "eval" and rec.get("step") == 0 and -1 not in self._seen_links:
            self._seen_links.add(-1)
            self._print(f"eval_loss before training: {rec['eval_loss']:.4f}")
        elif kind == "link" and rec["link"] not in self._seen_links:
            self._seen_links.add(rec["link"])
            self._print(link_line(rec, self.cfg.raclora.links, self.tokens_per_link))
            warning = landed_warning(rec, self._last_link)
            self._last_link = rec
            if warning is not None:
                self._print(warning)
        elif kind == "resize" and ("resize", rec["link"], rec["step"]) not in self._seen_resumes:
            self._seen_resumes.add(("resize", rec["link"], rec["step"]))
            self._print(resize_line(rec["from_workers"], rec["to_workers"], rec["link"]))
        elif kind == "resume" and ("resume", rec["link"], rec["step"]) not in self._seen_resumes:
            self._seen_resumes.add(("resume", rec["link"], rec["step"]))
            self._print(f"resumed at link {rec['link'] + 1} (step {rec['step']}): the worker group was (re)started "
                        "from the latest checkpoint")

    def poll(self) -> None:
        for line in self._lines():
            try:
                self._handle(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.poll_s)

    def stop(self) -> None:
        """Stops following after reading what the file holds now."""
        self._halt.set()
        self.join(timeout=5)
        self.poll()
        if self.bar is not None:
            self.bar.close()

    def summary(self, elapsed_s: float) -> str:
        """The closing line: links done, eval loss before -> after, time."""
        evals = [r["eval_loss"] for r in self.records if r.get("type") == "eval"]
        links = {r["link"]: r for r in self.records if r.get("type") == "link"}
        last = links[max(links)]["eval_loss"] if links else float("nan")
        first = evals[0] if evals else float("nan")
        m, s = divmod(int(elapsed_s), 60)
        return (f"done: {len(links)}/{self.cfg.raclora.links} links in {m}m{s:02d}s, eval_loss {first:.4f} -> {last:.4f}; "
                f"run folder {self.cfg.run.dir} (export: raclora export {self.cfg.run.dir} --format peft|merged)")


