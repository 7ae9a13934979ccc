"""Synthetic day-partitioned impression logs with a planted, known signal.

Every row's true click probability is written to ``p_true`` (never a feature), so each day's
oracle AUC is known. The logit is a sum of parts a model can learn, each chosen to exercise one
part of the system:

* user and item biases over Zipf-popular users and items, with new users and items every day;
* generic context fields: low-cardinality, frequency-skewed ("dimensionally ill") ids with
  per-value effects, and pairwise interactions between some of them;
* dense features with linear weights;
* a sequence effect: each row has a hidden session interest (a category); the behaviour history is
  drawn mostly from it, the target item sometimes; the logit grows with the share of history items
  whose category equals the target's. Only a model that reads the sequence can see it;
* further sequences (any other sequence of the schema, e.g. a long-term purchase history): drawn
  mostly from the user's fixed preferred category, with their own effect of the same form, so a
  model must read every sequence to reach the oracle;
* drift: context effects move a little every day.

Labels: the first label is the planted logit, further ones correlated, noisier copies — unless
``label_parts`` gives a label its own weights over the logit's parts (``LABEL_PARTS``: bias,
sequence, other_sequences, context, pairs, dense; and an ``offset``); each such label's true
probability is written as ``p_true_<label>`` and its oracle AUC reported (``configs/collapse.toml``).

The world (pools, effects) depends only on ``seed``; a day's rows only on ``(seed, day)``, so any
day range regenerates identically. Everything is columnar numpy: no per-row Python.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedding.schema import FeatureSchema, SequenceSpec
from pipeline.days import day_dir
from pipeline.validate import REQUEST_ID


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    seed: int = 0  # the world (pools, effects) depends only on it; a day's rows on (seed, day)
    start_day: str = "2026-01-01"  # day index 0: drift and new ids count from here
    rows_per_day: int = 100_000  # impressions written per day
    files_per_day: int = 4  # Parquet files per day partition (the unit workers are dealt)
    num_users: int = 20_000  # users on day 0 (Zipf-popular)
    num_items: int = 5_000  # items on day 0 (Zipf-popular)
    num_categories: int = 16  # item categories (the session interest is one of them)
    new_users_per_day: int = 1_000  # users that appear each day after day 0
    new_items_per_day: int = 200  # items that appear each day after day 0
    zipf_a: float = 1.05  # Zipf exponent of user and item popularity
    new_id_share: float = 0.05  # share of a day's rows that show that day's new users / items
    item_field: str = "item_id"  # the sparse field holding the target item
    category_field: str = "item_category"  # the sparse field holding the target's category
    sequence: str = "hist"  # the sequence carrying the session-interest effect
    min_hist_len: int = 1  # behaviours per history, drawn uniformly in [min, max]
    max_hist_len: int = 40  # beyond the sequence's max_len, only the newest max_len are kept
    interest_share: float = 0.7  # share of history items drawn from the session interest
    target_interest_share: float = 0.5  # share of targets drawn from the session interest
    context_cardinality: tuple[int, int] = (3, 50)  # [low, high] distinct values of a context field
    num_signal_fields: int = 8  # context fields with per-value effects (the others are noise)
    num_pairs: int = 4  # pairwise interactions planted among the signal fields
    user_scale: float = 0.15  # std of the per-user logit bias
    item_scale: float = 0.15  # std of the per-item logit bias
    category_scale: float = 0.3  # std of the per-category logit bias
    field_scale: float = 0.5  # std of a signal field's per-value effects
    pair_scale: float = 0.6  # std of a pairwise interaction's per-value-pair effects
    dense_scale: float = 0.3  # std of the dense features' linear weights
    sequence_scale: float = 3.0  # logit += scale × (history share in the target's category − 0.5)
    drift: float = 0.05  # per day, context effects move this much along a fixed direction
    bias: float = -1.6  # the logit's offset (sets the click rate)
    # every further sequence of the schema (beyond ``sequence``): history mostly from the user's
    # long-term preferred category; the click logit rises with its share of the target's category
    long_term_share: float = 0.6  # further sequences: share drawn from the user's preferred category
    other_sequence_scale: float = 2.0  # further sequences: the effect's scale, as sequence_scale
    # requests: > 1 writes runs of this many candidate rows sharing a ``request_id``, the user,
    # context fields, request-level dense features, history and timestamp, and differing in the
    # candidate (the fields of ``candidate_groups`` and candidate-level dense features)
    candidates_per_request: int = 1
    candidate_groups: tuple[str, ...] = ("item",)  # requests: the token groups that differ per candidate
    # several feedback labels with different dependencies: label → {part: weight, "offset": bias}
    # over the logit's parts (LABEL_PARTS). A label not named keeps the default: the first label
    # is the full planted logit, further ones correlated, noisier copies of it.
    label_parts: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.candidates_per_request < 1:
            raise ValueError(f"generator.candidates_per_request: must be >= 1, got {self.candidates_per_request}")
        for label, parts in self.label_parts.items():
            bad = sorted(set(parts) - set(LABEL_PARTS) - {"offset"})
            if bad:
                raise ValueError(f"generator.label_parts.{label}: unknown part(s) {bad}; choose from "
                                 f"{list(LABEL_PARTS)} and 'offset'")


# the additive parts of the planted logit, each a signal of its own kind (module docstring)
LABEL_PARTS = ("bias", "sequence", "other_sequences", "context", "pairs", "dense")


def _raw_ids(index: np.ndarray, salt: int) -> np.ndarray:
    """Dense indices → arbitrary 64-bit raw ids (a bijective mix), as int64."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) ^ np.uint64(salt)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x.view(np.int64)


def _zipf_sample(rng: np.random.Generator, n: int, size: int, a: float) -> np.ndarray:
    """Indices in [0, n) with P(i) ∝ 1/(i+1)^a (vectorized inverse-CDF)."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** a)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)


class World:
    """Everything that does not change with the day (up to drift): pools, effects."""

    def __init__(self, schema: FeatureSchema, cfg: GeneratorConfig, max_days: int = 400) -> None:
        self.schema, self.cfg = schema, cfg
        unknown = sorted(set(cfg.label_parts) - set(schema.labels))
        if unknown:
            raise ValueError(f"generator.label_parts: {unknown} are not labels of the schema {list(schema.labels)}")
        rng = np.random.default_rng([cfg.seed, 0])
        self.max_users = cfg.num_users + cfg.new_users_per_day * max_days
        self.max_items = cfg.num_items + cfg.new_items_per_day * max_days
        self.user_bias = rng.normal(0, cfg.user_scale, self.max_users)
        self.item_bias = rng.normal(0, cfg.item_scale, self.max_items)
        self.item_category = rng.integers(0, cfg.num_categories, self.max_items)
        self.category_effect = rng.normal(0, cfg.category_scale, cfg.num_categories)
        special = {schema.user_id, cfg.item_field, cfg.category_field}
        self.context = [f for f in schema.sparse if f.name not in special]
        lo, hi = cfg.context_cardinality
        self.cardinality = np.exp(rng.uniform(np.log(lo), np.log(hi), len(self.context))).astype(int)
        self.num_signal = min(cfg.num_signal_fields, len(self.context))
        self.effects = [rng.normal(0, cfg.field_scale, c) for c in self.cardinality[: self.num_signal]]
        self.drift_dir = [rng.normal(0, 1, c) for c in self.cardinality[: self.num_signal]]
        pairs = []
        if self.num_signal >= 2:
            for _ in range(cfg.num_pairs):
                a, b = rng.choice(self.num_signal, 2, replace=False)
                pairs.append((a, b, rng.normal(0, cfg.pair_scale,
                                               (self.cardinality[a], self.cardinality[b]))))
        self.pairs = pairs
        self.dense_w = rng.normal(0, cfg.dense_scale, len(schema.dense))
        self.items_by_category = [np.flatnonzero(self.item_category == c)
                                  for c in range(cfg.num_categories)]
        # a separate stream, so that schemas with one sequence generate exactly what they did
        self.user_pref = np.random.default_rng([cfg.seed, 2]).integers(0, cfg.num_categories, self.max_users)

    def day_rows(self, day_index: int) -> tuple[pa.Table, dict[str, float]]:
        cfg, schema = self.cfg, self.schema
        rng = np.random.default_rng([cfg.seed, 1, day_index])
        n = cfg.rows_per_day
        n_users = min(cfg.num_users + cfg.new_users_per_day * day_index, self.max_users)
        n_items = min(cfg.num_items + cfg.new_items_per_day * day_index, self.max_items)
        users = self._with_new_ids(rng, _zipf_sample(rng, n_users, n, cfg.zipf_a), n_users,
                                   cfg.new_users_per_day if day_index else 0)
        # requests: row i takes its request-level draws from the request's first row src[i]
        C = cfg.candidates_per_request
        src = (np.arange(n) // C) * C if C > 1 else None
        users = users if src is None else users[src]
        cols: dict[str, pa.Array] = {}
        logit = np.full(n, cfg.bias) + self.user_bias[users]
        parts = {name: np.zeros(n) for name in LABEL_PARTS}  # the same terms, kept apart per kind
        parts["bias"] += self.user_bias[users]

        # Sequence: a hidden session interest, history mostly from it, target sometimes.
        interest = rng.integers(0, cfg.num_categories, n)
        interest = interest if src is None else interest[src]
        target = self._with_new_ids(rng, _zipf_sample(rng, n_items, n, cfg.zipf_a), n_items,
                                    cfg.new_items_per_day if day_index else 0)
        from_interest = rng.random(n) < cfg.target_interest_share
        target = np.where(from_interest, self._item_of_category(rng, interest, n_items), target)
        if src is not None:  # distinct candidates within a request (a repeat would be a double-fire)
            for _ in range(20):
                key = src.astype(np.int64) * self.max_items + target
                order = np.argsort(key, kind="stable")
                repeat = np.zeros(n, dtype=bool)
                repeat[order[1:]] = key[order[1:]] == key[order[:-1]]
                if not repeat.any():
                    break
                target[repeat] = rng.integers(0, n_items, int(repeat.sum()))
        tcat = self.item_category[target]
        logit += self.item_bias[target] + self.category_effect[tcat]
        parts["bias"] += self.item_bias[target] + self.category_effect[tcat]
        for k, spec in enumerate(schema.sequences):
            if spec.name == cfg.sequence:
                seq_cols, same_share = self._sequence_columns(rng, spec, interest, cfg.interest_share,
                                                              tcat, n_items, src)
                logit += cfg.sequence_scale * (same_share - 0.5)
                parts["sequence"] += cfg.sequence_scale * (same_share - 0.5)
            else:
                srng = np.random.default_rng([cfg.seed, 3, day_index, k])
                seq_cols, same_share = self._sequence_columns(srng, spec, self.user_pref[users],
                                                              cfg.long_term_share, tcat, n_items, src)
                logit += cfg.other_sequence_scale * (same_share - 0.5)
                parts["other_sequences"] += cfg.other_sequence_scale * (same_share - 0.5)
            cols.update(seq_cols)

        # Context fields (skewed, low cardinality) with per-value effects and pairwise terms.
        values = []
        for j, f in enumerate(self.context):
            v = _zipf_sample(rng, int(self.cardinality[j]), n, 1.2)
            request_level = src is not None and f.group not in cfg.candidate_groups
            v = v[src] if request_level else v
            values.append(v)
            if j < self.num_signal:
                logit += self.effects[j][v] + cfg.drift * day_index * self.drift_dir[j][v]
                parts["context"] += self.effects[j][v] + cfg.drift * day_index * self.drift_dir[j][v]
            cols[f.name] = self._field_column(rng, f, v, salt=j + 7)
            if request_level:  # multi-valued extras too
                cols[f.name] = cols[f.name].take(pa.array(src))
        for a, b, table in self.pairs:
            logit += table[values[a], values[b]]
            parts["pairs"] += table[values[a], values[b]]

        dense = rng.normal(0, 1, (n, len(schema.dense))).astype(np.float32)
        if src is not None:
            request_dense = [k for k, f in enumerate(schema.dense) if not f.candidate]
            dense[:, request_dense] = dense[src][:, request_dense]
        logit += dense @ self.dense_w
        parts["dense"] += dense @ self.dense_w
        for k, f in enumerate(schema.dense):
            cols[f.name] = pa.array(dense[:, k])

        p = 1 / (1 + np.exp(-logit))
        names = {f.name: f for f in schema.sparse}
        if cfg.item_field in names:
            cols[cfg.item_field] = self._field_column(rng, names[cfg.item_field], target, salt=2)
        if cfg.category_field in names:
            cols[cfg.category_field] = self._field_column(rng, names[cfg.category_field], tcat, salt=3)
        uid = _raw_ids(users, 1)
        cols[schema.user_id] = pa.array(uid if schema.user_id_type == "int64" else uid.astype(str))
        labels, truth = {}, {}
        for k, name in enumerate(schema.labels):
            if name in cfg.label_parts:  # its own mix of the planted parts
                mix = cfg.label_parts[name]
                own = mix.get("offset", cfg.bias) + sum(w * parts[part] for part, w in mix.items() if part != "offset")
                pk = 1 / (1 + np.exp(-own))
            else:  # the first label is the planted task; further tasks are correlated, noisier copies
                pk = p if k == 0 else 1 / (1 + np.exp(-(logit * 0.5 - 1.0)))
            truth[name] = pk
            labels[name] = (rng.random(n) < pk).astype(np.float32)
            cols[name] = pa.array(labels[name])
        start = int(dt.datetime.combine(self._date(day_index), dt.time(), dt.UTC).timestamp())
        ts = start + np.sort(rng.integers(0, 86_400, n))
        cols[schema.ts] = pa.array(ts if src is None else ts[src])
        if src is not None:
            cols[REQUEST_ID] = pa.array(day_index * n + np.arange(n) // C, pa.int64())
        first = schema.labels[0]
        cols["p_true"] = pa.array(truth[first].astype(np.float32))
        stats = {"rows": n, "ctr": float(labels[first].mean()), "oracle_auc": auc(labels[first], truth[first])}
        if cfg.label_parts:  # every label's rate, oracle AUC and true probability
            for name in schema.labels[1:]:
                cols[f"p_true_{name}"] = pa.array(truth[name].astype(np.float32))
            for name in schema.labels:
                stats[f"ctr_{name}"] = float(labels[name].mean())
                stats[f"oracle_auc_{name}"] = auc(labels[name], truth[name])
        return pa.table(cols), stats

    # ---- pieces ------------------------------------------------------------------------------
    def _date(self, day_index: int) -> dt.date:
        return dt.date.fromisoformat(self.cfg.start_day) + dt.timedelta(days=day_index)

    def _with_new_ids(self, rng, ids: np.ndarray, pool: int, num_new: int) -> np.ndarray:
        """Give ``new_id_share`` of the rows one of today's ``num_new`` newest ids."""
        if num_new == 0:
            return ids
        fresh = rng.random(len(ids)) < self.cfg.new_id_share
        return np.where(fresh, pool - 1 - rng.integers(0, num_new, len(ids)), ids)

    def _item_of_category(self, rng: np.random.Generator, cats: np.ndarray, n_items: int) -> np.ndarray:
        """A uniformly random *existing* item of each given category (vectorized)."""
        out = np.empty(len(cats), dtype=np.int64)
        for c in range(self.cfg.num_categories):  # loop over categories, not rows
            rows = np.flatnonzero(cats == c)
            pool = self.items_by_category[c]
            pool = pool[pool < n_items]
            out[rows] = pool[rng.integers(0, len(pool), len(rows))]
        return out

    def _sequence_columns(self, rng, spec: SequenceSpec, interest, share, tcat, n_items, src=None):
        """One sequence's list columns: each behaviour's category is ``interest`` (per row) with
        probability ``share``, else random; returns the columns and, per row, the share of the
        visible (newest ``max_len``) behaviours in the target's category. ``src``: row i shows
        the history drawn for row ``src[i]`` (its request's first row)."""
        cfg = self.cfg
        n = len(interest)
        lengths = rng.integers(cfg.min_hist_len, cfg.max_hist_len + 1, n)
        total = int(lengths.sum())
        row = np.repeat(np.arange(n), lengths)
        use_interest = rng.random(total) < share
        cats = np.where(use_interest, interest[row], rng.integers(0, cfg.num_categories, total))
        items = self._item_of_category(rng, cats, n_items)
        actions = (rng.random(total) < 0.3).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        extra = {k: rng.integers(0, 100, total) for k, f in enumerate(spec.features)
                 if f.name not in ("item_id", "category", "action")}
        if src is not None:  # every row of a request shows its first row's history
            new_lengths = lengths[src]
            new_offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int32)
            take = np.repeat(offsets[:-1][src] - new_offsets[:-1], new_lengths) + np.arange(int(new_offsets[-1]))
            cats, items, actions = cats[take], items[take], actions[take]
            extra = {k: v[take] for k, v in extra.items()}
            lengths, offsets, total = new_lengths, new_offsets, int(new_offsets[-1])
            row = np.repeat(np.arange(n), lengths)
        # The effect reads what the model sees: the newest max_len items.
        pos_from_end = np.arange(total) - np.repeat(offsets[1:], lengths)  # -len..-1
        visible = pos_from_end >= -spec.max_len
        same = (cats == tcat[row]) & visible
        same_share = np.bincount(row, same, n) / np.minimum(lengths, spec.max_len)
        by_name = {"item_id": _raw_ids(items, 2), "category": _raw_ids(cats, 3), "action": actions}
        cols = {}
        for k, feat in enumerate(spec.features):
            vals = by_name.get(feat.name)
            if vals is None:
                vals = _raw_ids(extra[k], 100 + k)
            if feat.raw_type == "string":
                vals = vals.astype(str)
            cols[spec.column(feat)] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals))
        return cols, same_share

    def _field_column(self, rng, f, index, salt):
        ids = _raw_ids(index, salt)
        if f.multi_valued:  # the planted value first, then 0-2 random extra values of the field
            lengths = 1 + rng.integers(0, 3, len(index))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            vals = _raw_ids(rng.integers(0, 1000, int(offsets[-1])), salt + 1000)
            vals[offsets[:-1]] = ids
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(
                vals.astype(str) if f.raw_type == "string" else vals))
        return pa.array(ids.astype(str) if f.raw_type == "string" else ids)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties averaged."""
    from scipy.stats import rankdata

    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def generate(schema: FeatureSchema, cfg: GeneratorConfig, root: str | Path,
             days: list[dt.date], log=print) -> dict[str, dict[str, float]]:
    """Write ``days`` under ``root`` (one folder per day); returns per-day stats (oracle AUC)."""
    world = World(schema, cfg)
    start = dt.date.fromisoformat(cfg.start_day)
    report = {}
    for day in days:
        idx = (day - start).days
        if idx < 0:
            raise ValueError(f"day {day} is before generator.start_day {cfg.start_day}")
        t0 = time.perf_counter()
        table, stats = world.day_rows(idx)
        out = day_dir(root, day)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("part-*.parquet"):
            old.unlink()
        bounds = np.linspace(0, table.num_rows, cfg.files_per_day + 1).astype(int)
        for k in range(cfg.files_per_day):
            pq.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), out / f"part-{k:05d}.parquet")
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        report[day.isoformat()] = stats
        log(f"generated {day}: {stats['rows']:,} rows, ctr {stats['ctr']:.3f}, "
            f"oracle AUC {stats['oracle_auc']:.4f} ({stats['seconds']:.1f}s)")
    meta = Path(root) / "_generator.json"
    prev = json.loads(meta.read_text()) if meta.exists() else {}
    prev.update(report)
    meta.write_text(json.dumps({**prev, "_config": dataclasses.asdict(cfg)}, indent=1, default=str))
    return report
