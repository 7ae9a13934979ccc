"""The MLflow model registry: evaluation of exported versions, the promotion gate, champion history.

* ``evaluate_export`` — the one evaluation the gate uses: an exported (unsharded) version predicts
  every valid row of a day; metrics from ``jobs.metrics.evaluate``. Results are cached on the
  version as tags ``tokenrec.eval.<day>.<data-root hash>.<metric>`` (full precision), so a
  version is scored once per day and data.
* ``gate`` — the candidate becomes ``champion`` only when, on the same evaluation day, its AUC is
  at most ``auc_margin`` below the champion's, its logloss at most ``logloss_margin`` above, and
  its calibration inside ``calibration_band``; otherwise it gets the ``challenger`` alias.
* Champion history — the registered model's tag ``tokenrec.champion_history`` (a JSON list of
  versions, newest last) makes ``rollback`` restore the previous champion.
* Concurrency — changing the champion reads the history, then writes it and the alias: two
  ``promote`` / ``rollback`` / ``daily`` at once could lose one's update. ``Registry.lock``
  serializes them on any number of machines with the one thing every MLflow store guarantees,
  a unique registered-model name: the lock is the registered model ``<name>.tokenrec-lock``,
  created to take it and deleted to leave it (no shared filesystem needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deploy.export import load_servable
from embedding import storage
from jobs.metrics import evaluate
from pipeline.collate import collate
from pipeline.days import day_files, parse_days
from pipeline.row_hash import DuplicateFinder
from pipeline.validate import REQUEST_ID, expected_kinds, normalize, split_valid, to_canonical

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY = "tokenrec.champion_history"
LOCK_SUFFIX, LOCK_HOLDER, LOCK_TOKEN = ".tokenrec-lock", "tokenrec.lock_holder", "tokenrec.lock_token"
LOCK_SINCE = "tokenrec.lock_since"  # epoch seconds
GATE_METRICS = ("eval_auc", "eval_logloss", "eval_calibration", "eval_rows", "eval_positive_rate")


def gate_metrics(cfg=None) -> tuple[str, ...]:
    """The metrics the gate reads: the primary label's, or ``[gate].label``'s (``eval_auc_<label>``, …)."""
    label = getattr(cfg, "label", "") if cfg is not None else ""
    if not label:
        return GATE_METRICS
    return (tuple(f"eval_{k}_{label}" for k in ("auc", "logloss", "calibration")) + ("eval_rows",)
            + (f"eval_positive_rate_{label}",))


def evaluate_export(export_dir: str | Path, data_root: str | Path, day: str,
                    batch_rows: int = 8192) -> dict[str, float]:
    """Score an exported model on every valid row of ``day`` (``YYYY-MM-DD`` or a range
    ``A..B``; invalid rows are counted in ``eval_rows_invalid``, not scored)."""
    export_dir = Path(export_dir)
    model, schema = load_servable(export_dir / "model.pt", export_dir / "config.json")
    columns = list(expected_kinds(schema))
    # as in training's evaluation: TokenFormer scores rows sharing a request_id against one prefix
    requests = model.cfg.tokenformer.target_groups if model.cfg.tower == "tokenformer" else None
    labels, probs, users, invalid = [], [], [], 0
    with torch.no_grad():
        for path in day_files(data_root, parse_days(day)):
            keep = (REQUEST_ID,) if requests is not None and REQUEST_ID in pq.read_schema(path).names else ()
            table = normalize(pq.read_table(path, columns=columns + list(keep)), schema)[0]
            good, bad = split_valid(table, schema, duplicate=DuplicateFinder()(table), request_groups=requests)
            invalid += bad.num_rows
            good = to_canonical(good, schema, keep=keep)
            for start in range(0, good.num_rows, batch_rows):
                batch = collate(good.slice(start, batch_rows), schema)
                probs.append(torch.sigmoid(model(batch)).numpy())
                labels.append(batch.labels.numpy())
                users.append(batch.user_ids.numpy())
    if not labels:
        raise ValueError(f"day {day} under {data_root} has no valid row to evaluate on")
    m = evaluate(np.concatenate(labels), np.concatenate(probs), np.concatenate(users), names=schema.labels)
    return m | {"eval_rows_invalid": float(invalid)}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    candidate: dict[str, float]
    champion: dict[str, float] | None

    def summary(self) -> str:
        return ("champion" if self.promote else "challenger") + ": " + "; ".join(self.reasons)


def gate(candidate: dict[str, float], champion: dict[str, float] | None, cfg) -> Decision:
    """``cfg``: a ``jobs.config.GateConfig``. Pure: same inputs, same decision. Compares the
    primary label's metrics, or ``cfg.label``'s."""
    reasons, ok = [], True
    auc_k, ll_k, cal_k = gate_metrics(cfg)[:3]
    on = f" ({cfg.label})" if getattr(cfg, "label", "") else ""
    lo, hi = cfg.calibration_band
    cal = candidate[cal_k]
    if math.isnan(candidate[auc_k]):  # nothing to judge by: say why, not "calibration outside"
        rate = candidate.get(auc_k.replace("_auc", "_positive_rate", 1), float("nan"))
        if rate in (0.0, 1.0) or not candidate.get("eval_rows"):
            reasons.append(f"AUC{on} undefined on these rows: every label is one class "
                           f"({int(candidate.get('eval_rows', 0)):,} rows); gate on a day with both classes, "
                           "or promote without the gate (`tokenrec promote --version N --no-gate`)")
        else:
            reasons.append(f"AUC{on} undefined: the model's predictions are not finite (NaN or inf) on these rows")
        return Decision(False, reasons, candidate, champion)
    if lo <= cal <= hi:
        reasons.append(f"calibration {cal:.3f} inside [{lo}, {hi}]")
    else:
        ok = False
        reasons.append(f"calibration {cal:.3f} outside [{lo}, {hi}]")
    if champion is None:
        reasons.append("no champion yet")
        return Decision(ok, reasons, candidate, None)
    d_auc = candidate[auc_k] - champion[auc_k]
    d_ll = candidate[ll_k] - champion[ll_k]
    if d_auc >= -cfg.auc_margin:
        reasons.append(f"AUC{on} {candidate[auc_k]:.4f} vs champion {champion[auc_k]:.4f} "
                       f"({d_auc:+.4f}, margin {cfg.auc_margin})")
    else:
        ok = False
        reasons.append(f"AUC{on} {candidate[auc_k]:.4f} is {-d_auc:.4f} below champion "
                       f"{champion[auc_k]:.4f} (margin {cfg.auc_margin})")
    if d_ll <= cfg.logloss_margin:
        reasons.append(f"logloss{on} {candidate[ll_k]:.4f} vs champion {champion[ll_k]:.4f} "
                       f"({d_ll:+.4f}, margin {cfg.logloss_margin})")
    else:
        ok = False
        reasons.append(f"logloss{on} {candidate[ll_k]:.4f} is {d_ll:.4f} above champion "
                       f"{champion[ll_k]:.4f} (margin {cfg.logloss_margin})")
    return Decision(ok, reasons, candidate, champion)


class Registry:
    """One registered model: versions, aliases, lineage and the champion history."""

    def __init__(self, client: MlflowClient, name: str) -> None:
        self.client, self.name = client, name

    def lock_name(self) -> str:
        """The registered model that is the lock of ``lock``: ``<name>.tokenrec-lock``."""
        return f"{self.name}{LOCK_SUFFIX}"

    @contextlib.contextmanager
    def lock(self, timeout: float = 300.0, poll: float = 0.5, stale: float = 120.0):
        """Exclusive while the champion alias and its history change (read, then write), across
        processes and machines, through what every MLflow tracking store guarantees: a registered
        model name is unique. Taking the lock creates the registered model ``lock_name()``
        (tagged with its holder — host, pid, time — its start in epoch seconds and a random
        token); a second creator gets ``RESOURCE_ALREADY_EXISTS`` and waits, polling every
        ``poll`` s; leaving deletes it, only when the token is still ours. The lock is held for a
        few MLflow calls, never a training: one older than ``stale`` s was left by a holder that
        died holding it (SIGKILL, a lost machine) and is removed by the next taker (after reading
        its token again, so a lock just retaken by someone else is left alone). No shared
        filesystem is needed (object-storage clusters, ``docs/cluster.md``). Raises
        ``TimeoutError`` after ``timeout`` s, naming the holder and how to remove its lock."""
        name, token = self.lock_name(), uuid.uuid4().hex
        holder = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.create_registered_model(
                    name, tags={LOCK_HOLDER: holder, LOCK_TOKEN: token, LOCK_SINCE: f"{time.time():.3f}"},
                    description=f"tokenrec's lock on the champion of '{self.name}', held by {holder}; "
                                "deleted when released")
                break
            except MlflowException as e:
                held = self._lock_tags(name)
                if held.get(LOCK_TOKEN) == token:  # our create went through; its reply was lost and retried
                    break
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                since = float(held.get(LOCK_SINCE, "inf"))
                if time.time() - since > stale and self._lock_tags(name).get(LOCK_TOKEN) == held.get(LOCK_TOKEN):
                    print(f"[tokenrec] removing the champion lock of '{self.name}' left by "
                          f"{held.get(LOCK_HOLDER)} ({time.time() - since:.0f}s old: its holder is gone)", flush=True)
                    self._release(name, held.get(LOCK_TOKEN))
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the champion lock of '{self.name}' is held by {held.get(LOCK_HOLDER, 'another process')} "
                        f"(waited {timeout:.0f}s). If that process is gone, delete the registered model '{name}' "
                        f"(MLflow UI, or MlflowClient().delete_registered_model('{name}')) and run again") from None
                time.sleep(poll * (1 + random.random()))
        try:
            yield
        finally:
            self._release(name, token)

    def _release(self, name: str, token: str | None) -> None:
        """Delete the lock ``name`` when it still carries ``token`` (never another holder's)."""
        if token and self._lock_tags(name).get(LOCK_TOKEN) == token:
            with contextlib.suppress(MlflowException):  # already gone: nothing to release
                self.client.delete_registered_model(name)

    def _lock_tags(self, name: str) -> dict[str, str]:
        try:
            return dict(self.client.get_registered_model(name).tags)
        except MlflowException:  # released between our create and this read
            return {}

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            self.client.get_registered_model(self.name)
            return True
        except MlflowException:
            return False

    def versions(self) -> list:
        if not self.exists():
            return []
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def version(self, number: int | str):
        try:
            return self.client.get_model_version(self.name, str(number))
        except MlflowException:
            have = [v.version for v in self.versions()]
            raise ValueError(f"model '{self.name}' has no version {number}; versions: {have}") from None

    def alias(self, alias: str) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def champion(self) -> int | None:
        return self.alias(CHAMPION)

    def latest(self) -> int | None:
        versions = self.versions()
        return int(versions[-1].version) if versions else None

    def last_day(self, number: int | str) -> str:
        """The last day a version trained on (its ``tokenrec.days`` tag, ``A..B`` or ``A``)."""
        return self.version(number).tags.get("tokenrec.days", "").split("..")[-1]

    def parent_for(self, day: str) -> int | None:
        """The version to warm-start day ``day`` from: the champion, else the newest version,
        considering only versions whose training ended before ``day``."""
        before = [int(v.version) for v in self.versions()
                  if v.tags.get("tokenrec.days") and self.last_day(v.version) < day]
        champ = self.champion()
        if champ in before:
            return champ
        return before[-1] if before else None

    def history(self) -> list[int]:
        if not self.exists():
            return []
        raw = self.client.get_registered_model(self.name).tags.get(HISTORY, "[]")
        return [int(v) for v in json.loads(raw)]

    def run_tags(self, number: int | str) -> dict[str, str]:
        return self.client.get_run(self.version(number).run_id).data.tags

    # -- evaluation, cached per (version, day) ----------------------------------------------
    def evaluation(self, number: int | str, data_root: str | Path, day: str, log=print,
                   metrics: tuple[str, ...] = GATE_METRICS) -> dict[str, float]:
        """``evaluate_export`` of the version's export on ``day``; ``metrics`` are cached as tags."""
        v = self.version(number)
        root = hashlib.sha1(storage.absolute(data_root).encode()).hexdigest()[:8]
        prefix = f"tokenrec.eval.{day}.{root}."
        cached = {k[len(prefix):]: float(val) for k, val in v.tags.items() if k.startswith(prefix)}
        if all(m in cached for m in metrics):
            return cached
        export = self.run_tags(number).get("tokenrec.export")
        if (not export or not storage.is_published_folder(export)
                or not storage.exists(storage.join(export, "model.pt"))):
            raise FileNotFoundError(f"version {number}: exported model {export} is missing (or was never published)")
        # detail, not a phase: under a capturing console stdout is the command's log file
        print(f"[tokenrec] evaluating version {number} on {day}", flush=True)
        with storage.fetched(export) as local:  # object storage: a temporary download, removed after
            m = evaluate_export(local, data_root, day)
        missing = [k for k in metrics if k not in m]
        if missing:  # e.g. [gate].label names a label this version was not trained with
            raise ValueError(f"version {number} has no {missing} on {day} (its labels differ from [gate].label's); "
                             "choose another [gate].label, or `tokenrec promote --version N --no-gate`")
        for k in dict.fromkeys(GATE_METRICS + tuple(metrics)):
            self.client.set_model_version_tag(self.name, str(number), prefix + k, repr(float(m[k])))
        return m

    # -- writing -----------------------------------------------------------------------------
    def set_champion(self, number: int, why: str) -> None:
        with self.lock():
            self._set_champion(number, why)

    def _set_champion(self, number: int, why: str) -> None:
        history = self.history()
        if not history or history[-1] != number:
            history.append(number)
        self.client.set_model_version_tag(self.name, str(number), "tokenrec.gate", why[:4000])
        self.client.set_model_version_tag(self.name, str(number), "tokenrec.champion_since",
                                          time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._describe(number, "champion", why)
        self.client.set_registered_model_tag(self.name, HISTORY, json.dumps(history))
        self.client.set_registered_model_alias(self.name, CHAMPION, str(number))
        if self.alias(CHALLENGER) == number:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)

    def set_challenger(self, number: int, why: str) -> None:
        self.client.set_registered_model_alias(self.name, CHALLENGER, str(number))
        self.client.set_model_version_tag(self.name, str(number), "tokenrec.gate", why[:4000])
        self._describe(number, "challenger", why)

    def _describe(self, number: int, alias: str, why: str) -> None:
        """The version's description on its MLflow page: what it was trained on, from which
        parent, and the gate's decision."""
        tags = self.version(number).tags
        parent = tags.get("tokenrec.parent_version")
        text = (f"{tags.get('tokenrec.tower', 'model')} trained on {tags.get('tokenrec.days', '?')}"
                + (f", warm-started from version {parent}" if parent else ", trained from scratch")
                + f"; evaluated on {tags.get('tokenrec.eval_day', '?')}.\n\nGate → **{alias}**: {why}")
        self.client.update_model_version(self.name, str(number), description=text[:5000])

    def decide(self, number: int, data_root: str | Path, day: str, cfg, log=print) -> Decision:
        """Evaluate the candidate and the champion on ``day`` and set the alias the gate says."""
        champ = self.champion()
        if champ == number:
            raise ValueError(f"version {number} is already the champion")
        first = day.split("..")[0]
        seen = [v for v in (number, champ) if v is not None and self.last_day(v) >= first]
        if seen:  # a model scored on a day it trained on would win unfairly
            text = (f"gate on {day}: challenger: version(s) {seen} trained on days up to "
                    f"{max(self.last_day(v) for v in seen)}, not before the evaluation day: not comparable")
            self.set_challenger(number, text)
            log(f"version {number} → {text}")
            return Decision(False, [text], {}, None)
        cand = self.evaluation(number, data_root, day, log, gate_metrics(cfg))
        champ_m = self.evaluation(champ, data_root, day, log, gate_metrics(cfg)) if champ is not None else None
        d = gate(cand, champ_m, cfg)
        text = f"gate on {day}: " + d.summary()
        if d.promote:
            self.set_champion(number, text)
        else:
            self.set_challenger(number, text)
        log(f"version {number} → {text}")
        return d

    def rollback(self, log=print) -> int:
        """Give ``champion`` back to the previous champion; the current one is tagged rolled back."""
        with self.lock():
            return self._rollback(log)

    def _rollback(self, log=print) -> int:
        history = self.history()
        current = self.champion()
        if current is None:
            raise ValueError(f"model '{self.name}' has no champion to roll back")
        if history and history[-1] == current:
            history.pop()
        existing = {int(v.version) for v in self.versions()}
        deleted = [v for v in history if v not in existing]
        if deleted:  # a version deleted from the registry since it was champion: not a target
            log(f"skipping deleted version(s) {deleted} in the champion history of '{self.name}'")
            history = [v for v in history if v in existing]
        if not history:
            raise ValueError(f"version {current} is the first champion of '{self.name}'"
                             + (f" still in the registry (earlier champions {deleted} were deleted)" if deleted else "")
                             + "; there is no previous one to roll back to")
        previous = history[-1]
        self.client.set_registered_model_alias(self.name, CHAMPION, str(previous))
        self.client.set_registered_model_tag(self.name, HISTORY, json.dumps(history))
        self.client.set_model_version_tag(self.name, str(current), "tokenrec.rolled_back",
                                          time.strftime("%Y-%m-%dT%H:%M:%S"))
        log(f"champion rolled back from version {current} to version {previous}")
        return previous

    def table(self) -> list[dict]:
        """One row per version: aliases, days, metrics, lineage, gate decision."""
        rows = []
        for v in self.versions():
            tags = v.tags
            aliases = self.version(v.version).aliases  # search results leave aliases out
            r = tags.get("tokenrec.eval_range", "eval")  # [train.eval_ranges]: the first range
            rows.append({
                "version": int(v.version), "aliases": ",".join(sorted(aliases)),
                "days": tags.get("tokenrec.days", ""), "eval_day": tags.get("tokenrec.eval_day", ""),
                "tower": tags.get("tokenrec.tower", ""), "seed": tags.get("tokenrec.seed", ""),
                "auc": tags.get(f"{r}_auc", ""), "gauc": tags.get(f"{r}_gauc", ""),
                "logloss": tags.get(f"{r}_logloss", ""), "calibration": tags.get(f"{r}_calibration", ""),
                "rows_per_s": tags.get("train_rows_per_s", ""),
                "parent": tags.get("tokenrec.parent_version", ""),
                "gate": tags.get("tokenrec.gate", ""), "run_id": v.run_id,
            })
        return rows
