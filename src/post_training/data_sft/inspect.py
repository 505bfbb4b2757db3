"""Look at the SFT data the way training sees it.

    python -m post_training.data_sft.inspect [dataset=...] [model=...] [split=train] num_samples=3
    python -m post_training.data_sft.inspect mode=token_stats [dataset=...] [model=...]

``mode=samples`` prints, for the first ``num_samples`` rows of the split, each stage: the raw row
(single-source splits), the canonical messages, the templated text, and the tokens with the
completion (trained) tokens marked ``[[...]]`` (green on a terminal). A preference dataset (its
split's ``transform`` is a preference transform: ``preference``, ``hh_rlhf``, ...) shows, per pair,
the raw row, the canonical prompt / chosen / rejected and the tokens of both sides as training
sees them (``data.truncation``, prompts up to ``model.max_seq_length - 1`` tokens).
``mode=token_stats`` tokenizes the whole split with the training options and prints tokens per
source, prompt / completion / total length percentiles, the generation ratio (completion / prompt
tokens), packing efficiency at ``model.max_seq_length``, the examples longer than it (before
truncation: dropped or truncated per ``data.truncation``) and drops per reason; it writes
``token_stats.json`` and a histogram ``token_stats.png`` into the run dir (the total-length panel
shows lengths before truncation, ``max_seq_length`` marked by a vertical line).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from post_training.data_preference.encode import PairReport, encode_pairs
from post_training.data_preference.pairs import (
    is_preference_spec,
    load_preference_pairs,
    spec_label,
)
from post_training.data_sft.dataset_config import dataset_specs, load_train_eval
from post_training.data_sft.packing import pack_examples, packing_efficiency
from post_training.data_sft.sources import load_source
from post_training.data_sft.templates import ChatTemplate, resolve_template
from post_training.data_sft.tokenize import ChatEncoder, FilterReport, TokenizeOptions
from post_training.data_sft.training_data import iter_messages, tokenize_options
from post_training.errors import ConfigError, DataError
from post_training.frame import entrypoint
from post_training.modeling.loading import load_tokenizer
from post_training.utils.config import register_resolvers, to_container

log = logging.getLogger(__name__)
register_resolvers()

PERCENTILES = (50, 90, 99, 100)


def show_tokens(tokens: Sequence[str], completion: Sequence[int], color: bool) -> str:
    """Tokens joined, with runs of completion tokens marked."""
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out, inside = [], False
    for token, c in zip(tokens, completion, strict=True):
        if c and not inside:
            out.append(open_)
        if not c and inside:
            out.append(close)
        inside = bool(c)
        out.append(token)
    if inside:
        out.append(close)
    return "".join(out)


class LengthRecordingEncoder(ChatEncoder):
    """A :class:`ChatEncoder` that also records, in ``full_lengths``, the length before
    truncation of every example that reaches the length check (those the role and empty-turn
    filters kept), BOS included: what ``max_seq_length`` is compared with."""

    def __init__(self, tokenizer: Any, template: Any, options: TokenizeOptions) -> None:
        super().__init__(tokenizer, template, options)
        self.full_lengths: list[int] = []

    def _example(
        self, enc: Any, spans: list[tuple[int, int]], report: FilterReport
    ) -> dict[str, np.ndarray] | None:
        ids = enc.ids
        bos = self.options.add_bos and (len(ids) == 0 or ids[0] != self.bos_id)
        self.full_lengths.append(len(ids) + int(bos))
        return super()._example(enc, spans, report)


def _encoder(config: Mapping[str, Any]) -> tuple[Any, LengthRecordingEncoder, ChatTemplate | None]:
    tokenizer = load_tokenizer(config["model"])
    template = resolve_template(config["model"].get("chat_template"))
    template = template if isinstance(template, ChatTemplate) else None
    encoder = LengthRecordingEncoder(tokenizer, template, tokenize_options(config))
    return tokenizer, encoder, template


def _split(config: Mapping[str, Any], split: str) -> Any:
    train, eval_ds, _ = load_train_eval(config["dataset"])
    ds = train if split == "train" else eval_ds
    if ds is None:
        raise ConfigError(f"dataset {config['dataset']['name']} has no {split} split")
    return ds


def samples(config: Mapping[str, Any], split: str, num_samples: int) -> str:
    tokenizer, encoder, _ = _encoder(config)
    ds = _split(config, split)
    spec = dataset_specs(config["dataset"])[0 if split == "train" else 1]
    raw = load_source(spec) if isinstance(spec, Mapping) and "path" in spec else None
    color = sys.stdout.isatty()
    lines = []
    for i in range(min(num_samples, len(ds))):
        row = ds[i]
        lines.append(f"=== {split} row {i + 1} (source {row.get('source')}) ===")
        if raw is not None:
            lines.append("--- raw ---\n" + json.dumps(raw[i], ensure_ascii=False, default=str))
        lines.append(
            "--- messages ---\n"
            + "\n".join(json.dumps(m, ensure_ascii=False) for m in row["messages"])
        )
        report = FilterReport()
        examples, _ = encoder.encode(
            [row["messages"]],
            split,
            report,
            locate=lambda _, n=i: f"{split}: row {n + 1}",
            drop_empty_turns=True,  # as the training data
        )
        if not examples:
            lines.append(f"--- dropped: {dict(report.dropped)} ---")
            continue
        ex = examples[0]
        try:
            text, _ = encoder.render(row["messages"], f"{split}: row {i + 1}")
        except Exception as err:
            text = f"<cannot render: {err}>"
        lines.append("--- templated text ---\n" + text)
        tokens = [tokenizer.decode([t]) for t in ex["input_ids"].tolist()]
        n_c = int(ex["completion_mask"].sum())
        lines.append(
            f"--- tokens: {len(tokens)} ({len(tokens) - n_c} prompt, {n_c} completion "
            f"{'green' if color else '[[marked]]'}) ---\n"
            + show_tokens(tokens, ex["completion_mask"].tolist(), color)
            + "\nids: "
            + " ".join(map(str, ex["input_ids"].tolist()))
        )
    return "\n".join(lines)


def preference_spec(config: Mapping[str, Any], split: str) -> dict[str, Any] | None:
    """The split's source (or mixture) spec when it holds preference pairs
    (:func:`~post_training.data_preference.pairs.is_preference_spec`), else None (SFT)."""
    spec = dataset_specs(config["dataset"])[0 if split == "train" else 1]
    return dict(spec) if is_preference_spec(spec) else None


def _lines(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(json.dumps(dict(m), ensure_ascii=False) for m in messages)


def preference_samples(
    config: Mapping[str, Any], split: str, spec: Mapping[str, Any], num_samples: int
) -> str:
    """:func:`samples` for a preference split: raw row, prompt / chosen / rejected, the tokens of
    each side (one training row holds both, back to back)."""
    tokenizer, encoder, _ = _encoder(config)
    where = f"dataset.{split}"
    source = load_preference_pairs(spec, where)
    pairs = source.pairs
    mixed = "sources" in spec
    raw = None if source.dropped or mixed else load_source(spec)  # else pair i is not row i
    max_prompt = int(config["model"]["max_seq_length"]) - 1
    color = sys.stdout.isatty()
    dropped = f", rows dropped: {source.dropped}" if source.dropped else ""
    lines = [f"{len(pairs)} pairs in {where} ({spec_label(spec)}{dropped})"]
    for i, pair in enumerate(pairs[:num_samples]):
        lines.append(f"=== {split} pair {i + 1} ({source.locate(i)}) ===")
        if raw is not None:
            lines.append("--- raw ---\n" + json.dumps(raw[i], ensure_ascii=False, default=str))
        for field in ("prompt", "chosen", "rejected"):
            lines.append(f"--- {field} ---\n" + _lines(pair[field]))
        report = PairReport()
        try:
            encoded = encode_pairs([pair], encoder, where, max_prompt, report)
        except DataError:  # the pair was dropped (too long for data.truncation=drop, ...)
            lines.append(f"--- dropped: {dict(report.dropped)} ---")
            continue
        row = encoded[0]
        cut = int(np.flatnonzero(row["position_ids"] == 0)[1])  # the rejected side starts here
        for side, part in (("chosen", slice(0, cut)), ("rejected", slice(cut, None))):
            ids, mask = row["input_ids"][part].tolist(), row["completion_mask"][part].tolist()
            tokens = [tokenizer.decode([t]) for t in ids]
            n_c = int(sum(mask))
            lines.append(
                f"--- {side} tokens: {len(tokens)} ({len(tokens) - n_c} prompt, {n_c} completion "
                f"{'green' if color else '[[marked]]'}"
                f"{'; truncated' if report.truncated else ''}) ---\n"
                + show_tokens(tokens, mask, color)
            )
    return "\n".join(lines)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{p}": 0.0 for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def token_stats(config: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Statistics of the tokenized split (see the module docstring)."""
    _, encoder, _ = _encoder(config)
    ds = _split(config, split)
    report = FilterReport()
    examples, index = encoder.encode(
        iter_messages(ds), f"dataset {split}", report, drop_empty_turns=True
    )
    sources = ds["source"] if "source" in ds.column_names else ["-"] * len(ds)
    total = np.array([len(e["input_ids"]) for e in examples])
    completion = np.array([int(e["completion_mask"].sum()) for e in examples])
    prompt = total - completion
    per_source: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i, n, c in zip(index, total.tolist(), completion.tolist(), strict=True):
        entry = per_source[sources[i]]
        entry["examples"] += 1
        entry["tokens"] += n
        entry["completion_tokens"] += c
    capacity = int(config["model"]["max_seq_length"])
    packed, _ = pack_examples(examples, capacity) if examples else ([], [])
    full = np.array(encoder.full_lengths, dtype=np.int64)
    above = int((full > capacity).sum())
    return {
        "split": split,
        "examples": len(examples),
        "tokens": int(total.sum()),
        "per_source": {k: dict(v) for k, v in sorted(per_source.items())},
        "prompt_length": _percentiles(prompt),
        "completion_length": _percentiles(completion),
        "total_length": _percentiles(total),
        "generation_ratio": float(completion.sum() / max(prompt.sum(), 1)),
        "generation_ratio_per_example": _percentiles(completion / np.maximum(prompt, 1)),
        "packing": {
            "max_seq_length": capacity,
            "bins": len(packed),
            "efficiency": packing_efficiency(packed, capacity),
            "padded_efficiency": float(total.sum() / max(len(total) * total.max(initial=1), 1)),
        },
        "above_max_seq_length": {
            "max_seq_length": capacity,
            "examples": above,
            "of": len(full),
            "share": above / max(len(full), 1),
            "handling": "truncated" if encoder.options.truncation == "truncate" else "dropped",
        },
        "filters": report.as_dict(),
        "_lengths": {"prompt": prompt, "completion": completion, "total": full},
    }


def histogram_figure(
    lengths: Mapping[str, np.ndarray], title: str, above: Mapping[str, Any] | None = None
) -> Any:
    """The token-length histograms (a matplotlib ``Figure``, Agg canvas, no pyplot): one panel
    per entry of ``lengths``; ``above`` (:func:`token_stats`' ``above_max_seq_length``) marks
    ``max_seq_length`` on the ``total`` panel with a vertical line labelled
    ``max_seq_length=N``, the examples above it counted in that panel's title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(lengths), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(lengths)))
    for ax, (name, values) in zip(axes, lengths.items(), strict=True):
        ax.hist(values, bins=50, color="tab:blue")
        ax.set_title(f"{name} tokens")
        ax.set_xlabel("tokens")
        ax.set_ylabel("examples")
        if name == "total" and above is not None:
            limit = int(above["max_seq_length"])
            ax.axvline(limit, color="tab:red", linestyle="--", label=f"max_seq_length={limit}")
            ax.set_title(
                f"total tokens (before truncation)\n{above['examples']} of {above['of']} "
                f"({100 * above['share']:.1f}%) above max_seq_length: {above['handling']}",
                fontsize=10,
            )
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_histogram(
    lengths: Mapping[str, np.ndarray],
    path: Path,
    title: str,
    above: Mapping[str, Any] | None = None,
) -> None:
    """Save :func:`histogram_figure` as the PNG ``path``."""
    histogram_figure(lengths, title, above).savefig(path, dpi=100)


def format_stats(stats: Mapping[str, Any]) -> str:
    def pct(d: Mapping[str, float]) -> str:
        return " ".join(f"{k}={v:.0f}" for k, v in d.items())

    lines = [
        f"{stats['split']}: {stats['examples']} examples, {stats['tokens']} tokens",
        "tokens per source:",
        *(
            f"  {name}: {v['examples']} examples, {v['tokens']} tokens "
            f"({v['completion_tokens']} completion)"
            for name, v in stats["per_source"].items()
        ),
        f"prompt length      {pct(stats['prompt_length'])}",
        f"completion length  {pct(stats['completion_length'])}",
        f"total length       {pct(stats['total_length'])}",
        f"generation ratio (completion/prompt tokens): {stats['generation_ratio']:.3f}",
        f"packing at {stats['packing']['max_seq_length']}: {stats['packing']['bins']} bins, "
        f"{100 * stats['packing']['efficiency']:.1f}% full "
        f"(padded batches of the longest: {100 * stats['packing']['padded_efficiency']:.1f}%)",
        *(
            [
                f"above max_seq_length={a['max_seq_length']} (before truncation): "
                f"{a['examples']} of {a['of']} examples ({100 * a['share']:.1f}%), {a['handling']}"
            ]
            if (a := stats.get("above_max_seq_length"))
            else []
        ),
        f"drops per reason: {stats['filters']['dropped'] or 'none'}",
    ]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any] | str:
    config = to_container(cfg)
    split = config["split"]
    if split not in ("train", "eval"):
        raise ConfigError(f"split must be train or eval, got {split!r}")
    pairs = preference_spec(config, split)
    if config["mode"] == "samples":
        if pairs is not None:
            out = preference_samples(config, split, pairs, int(config["num_samples"]))
        else:
            out = samples(config, split, int(config["num_samples"]))
        print(out, flush=True)
        return out
    if config["mode"] != "token_stats":
        raise ConfigError(f"mode must be samples or token_stats, got {config['mode']!r}")
    if pairs is not None:
        raise ConfigError(
            f"mode=token_stats reads SFT datasets; dataset {config['dataset']['name']} is a "
            "preference one (train_preference logs its pairs kept / truncated / dropped)"
        )
    stats = token_stats(config, split)
    lengths = stats.pop("_lengths")
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "token_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_histogram(
        lengths,
        run_dir / "token_stats.png",
        f"{config['dataset']['name']} {split}",
        stats["above_max_seq_length"],
    )
    print(format_stats(stats), flush=True)
    print(f"Written {run_dir / 'token_stats.json'} and {run_dir / 'token_stats.png'}", flush=True)
    return stats


main = entrypoint("data-inspect")(run)


if __name__ == "__main__":
    main()
