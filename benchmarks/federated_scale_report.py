"""Render ``benchmarks/results/federated_scale.json`` as Markdown.

Used by ``benchmarks/federated_scale.py`` (``--render-only`` renders again
without running anything).
"""

from __future__ import annotations

import statistics
import textwrap

MIB = 2**20
PAPER = "up to 59 %"


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.2f}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.2f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _meta(entry: dict) -> list[str]:
    return [
        f"Command: `{entry['command']}`; started {entry['started']}, "
        f"{entry['minutes']} minutes; load average (1, 5, 15 min) before "
        f"{entry['load_before']}, after {entry['load_after']}.",
        f"Machine: {entry['machine']}.",
        "",
    ]


def _window(result: dict) -> int:
    # Records from before the window was an option ran the app's default.
    return result.get("window", 64)


def _runner(result: dict) -> str:
    """The runner, with the Flower app's window of messages in flight."""
    if result["runner"] != "flower":
        return result["runner"]
    return f"flower, window {_window(result)}"


def _rise(result: dict) -> int:
    return max(r["rss_peak"] - r["rss_before"] for r in result["rounds"])


def _bound(result: dict) -> float:
    """The limit for the rise: 1.5 x the model plus the largest message."""
    return 1.5 * result["model_float32_bytes"] + result["largest_message"]


def _server_seconds(result: dict) -> float:
    """The server's own seconds per round, mean over the rounds."""
    return statistics.fmean(sum(r["server_seconds"].values()) for r in result["rounds"])


def _ms_per_client(result: dict) -> float:
    accepted = statistics.fmean(r["accepted"] for r in result["rounds"])
    return 1000 * _server_seconds(result) / max(accepted, 1)


def _wall(result: dict) -> float:
    return statistics.fmean(r["wall_seconds"] for r in result["rounds"])


def _measured(entries: list[dict]) -> list[str]:
    lines = ["## Streaming aggregation, measured", ""]
    for entry in entries:
        result = entry["result"]
        lines += [f"*{_runner(result)}, {result['clients_per_round']}*: "]
        lines += _meta(entry)
    lines += [
        "`fed_scale.yaml`: 1,000 utterance-level clients (SynthSpeech's 480",
        "training utterances, each serving 2 or 3 clients), a 6M-parameter",
        "Conformer-CTC, one local SGD step per client, e3m7 with 10 % of the weight",
        "values float32 re-drawn per client, 10 % of each round's sampled clients",
        "dropping out (seeded). Each configuration in fresh processes. *Server s*:",
        "the server's own time per round (encode + decode + validate + aggregate,",
        "from its report); *wall s*: the whole round, clients' training included.",
        "*RSS*: the server process's resident memory when the round opened and its",
        "peak until it closed; *bound*: 1.5 x the float32 model plus the largest",
        "single message of the round (the limit for the rise). Embedded:",
        "the library's round in the server process, its client in a worker",
        "process. Flower: the Simulation Engine; the ServerApp process also holds",
        "Flower's in-memory state of the messages and Ray's driver, and the app",
        "keeps at most *window* train messages unanswered (`max-in-flight`; see",
        "below the table). Means over the rounds; RSS rise is the larger round's.",
        "",
    ]
    rows, linear = [], {}
    results = [entry["result"] for entry in entries]
    for result in results:
        rounds = result["rounds"]
        k = result["clients_per_round"]

        def mean(key, sub=None, rounds=rounds):
            values = [(r[key] if sub is None else r[key][sub]) for r in rounds]
            return statistics.fmean(values)

        server = _server_seconds(result)
        rise, bound = _rise(result), _bound(result)
        linear.setdefault(_runner(result), {})[k] = _ms_per_client(result)
        rows.append(
            [
                _runner(result),
                k,
                f"{mean('sampled'):.0f} / {mean('accepted'):.0f}",
                f"{server:.2f}",
                " / ".join(
                    f"{mean('server_seconds', s):.2f}"
                    for s in ("encode", "decode", "validate", "aggregate")
                ),
                f"{_ms_per_client(result):.2f}",
                f"{_wall(result):.1f}",
                f"{mean('bytes_down') / MIB:.1f} / {mean('bytes_up') / MIB:.1f}",
                _mib(max(r["rss_before"] for r in rounds)),
                f"{rise / MIB:.2f}",
                f"{bound / MIB:.2f}",
                f"{rise / bound:.2f}",
            ]
        )
    lines += _table(
        [
            "runner",
            "clients per round",
            "sampled / accepted",
            "server s",
            "encode / decode / validate / aggregate s",
            "server ms per client",
            "wall s",
            "MiB down / up",
            "RSS before MiB",
            "RSS rise MiB",
            "bound MiB",
            "rise / bound",
        ],
        rows,
    )
    first = results[0]
    lines += [
        "",
        f"Model: {first['model_float32_bytes']:,} bytes in float32; largest "
        f"message {first['largest_message']:,} bytes. Predicted by "
        "`benchmarks/plan_sizes.py`'s `round_sizes` for the rise (running sums + the "
        "round's compressed broadcast + one message + one decoded entry): "
        f"{_mib(first['predicted_rise'])} MiB.",
        "",
    ]
    lines += _embedded_parts(results)
    lines += _flower_parts(results)
    for runner, per_client in linear.items():
        ks = sorted(per_client)
        if len(ks) < 2:
            continue
        lines.append(
            f"- {runner}: server milliseconds per accepted client "
            + ", ".join(f"{per_client[k]:.2f} at {k}" for k in ks)
            + f" (ratio {ks[-1]} to {ks[0]} clients: "
            f"{per_client[ks[-1]] / per_client[ks[0]]:.2f}; 1.00 is linear)."
        )
    lines.append("")
    return lines


def _fill(text: str) -> str:
    return textwrap.fill(text, 76, break_on_hyphens=False)


def _embedded_parts(results: list[dict]) -> list[str]:
    """Where the embedded server's rise goes: the record's figures, and what a
    probe of the round found (its outputs are not part of the record)."""
    embedded = {r["clients_per_round"]: r for r in results if r["runner"] == "embedded"}
    if not embedded:
        return []
    over = ", ".join(
        f"{_mib(_rise(r) - r['predicted_rise'])} MiB at {k}"
        for k, r in sorted(embedded.items())
    )
    where = (
        "Where the embedded rise goes. A probe of the 10-client round (VmRSS, "
        "RssAnon, RssShmem and glibc's `mallinfo2` read before and after every "
        "server call and every decoded entry, the peak mark reset at each; run "
        "outside this record, its outputs not kept) found the peak while a "
        "broadcast is encoded (folding a reply holds the same sizes): the "
        "running float32 sums (the model, 23.31 MiB, mostly in mapped pages), "
        "the round's compressed broadcast (7.95 MiB predicted), the message "
        "(9.69 MiB) and 1.3 MiB more anonymous memory in round 1, 0.6 MiB in "
        "round 2 (not broken down: the round's Python objects, the heap's "
        "slack). Round 1 also holds what later rounds find in place: the "
        "decoding workspace (0.43 MiB, one buffer of the largest entry's values "
        "and one of its codes) and library code run for the first time "
        "(0.37 MiB of file pages): 42.83 MiB in round 1 and 41.38 MiB in "
        f"round 2 under the probe. Measured rise over the prediction: {over} "
        "clients per round; what grows with the clients is the round's "
        "per-client bookkeeping (fold order, report, metrics), not broken down."
    )
    before = (
        "Before the server decoded into reused buffers, the same rows read "
        "54.29, 57.77 and 53.48 MiB (1.22, 1.29 and 1.20 of the bound; their "
        "seconds at `nice -n -10` and a load of 5.3 to 9.6, not comparable with "
        "these at `nice -n 5` and a load of about 3). The probe put the excess in the "
        "fold: the heap's size and its bytes in use stayed flat while RSS rose "
        "by about 7 MiB per reply in round 2 (8.5 MiB in round 1's first fold). "
        "`malloc_trim`, called before each message and reply, gives back the "
        "pages of the heap's free chunks but leaves the chunks in the heap; "
        "each entry's decoding temporaries (three or four copies of its payload "
        "in `CompressedTensor.from_bytes`, its float32 values, an `isfinite` "
        "mask) landed in one free chunk after another and made their pages "
        "resident again until the next trim. With that gone, closing the round "
        "came next (an `isfinite` mask per entry of the new model, the last "
        "reply still resident: 1.2 MiB above the rest of the round). The server "
        "now decodes each entry into a reused `Workspace` outside the heap, "
        "counts non-finite values without a mask (the native kernel) and trims "
        "when the round closes. Its time per reply fell too: a probe timing "
        "`receive` on this model (40 replies, one thread, outside this record) "
        "measured validation at 25 ms per reply before and 3.3 ms after, "
        "decoding unchanged at about 16 ms."
    )
    return [_fill(where), "", _fill(before), ""]


def _flower_parts(results: list[dict]) -> list[str]:
    """What the Flower rows say about the window of messages in flight."""
    flower = {
        (_window(r), r["clients_per_round"]): r
        for r in results
        if r["runner"] == "flower"
    }
    at_100 = sorted((w, r) for (w, k), r in flower.items() if k == 100)
    if len(at_100) < 2:
        return []
    windows = "; ".join(
        f"window {w}: {_mib(_rise(r))} MiB, {_wall(r):.1f} s" for w, r in at_100
    )
    (smallest, first), (largest, last) = at_100[0], at_100[-1]
    fastest = min(at_100, key=lambda item: _wall(item[1]))[0]
    text = (
        "Flower's rows, and the window. In Flower's Simulation Engine the "
        "ServerApp's process also holds Flower's in-memory state (its records "
        "of the messages and replies in flight) and Ray's driver: its rise is "
        "the library's (the embedded rows run the same server code) plus what "
        "Flower keeps. At 100 clients per round (RSS rise, round wall time): "
        f"{windows}. Even at window {smallest} the rise is "
        f"{_rise(first) / _bound(first):.1f} times the bound that the embedded "
        "server meets; the window does not remove Flower's part, it limits it "
        f"({_mib(_rise(first))} MiB at window {smallest}, {_mib(_rise(last))} "
        f"MiB at {largest})."
    )
    for w in sorted({w for w, _ in flower}):
        series = sorted((k, r) for (v, k), r in flower.items() if v == w)
        if len(series) < 2:
            continue
        (k0, r0), (k1, r1) = series[0], series[-1]
        text += (
            f" At window {w}, from {k0} to {k1:,} clients per round, the rise "
            f"goes from {_mib(_rise(r0))} to {_mib(_rise(r1))} MiB and the "
            f"server's milliseconds per client from {_ms_per_client(r0):.1f} to "
            f"{_ms_per_client(r1):.1f}."
        )
    text += (
        f" Window {smallest} trains one client at a time; of the windows run "
        f"(one run each), window {fastest} was the fastest here, where the "
        "engine trains two clients at once on two cores. The recipe's default "
        "(`max-in-flight = 64`) is for deployments, where as many devices as "
        'the window may train at once (FLOWER.md, "Rounds at scale").'
    )
    return [_fill(text), ""]


def _analytic(entry: dict) -> list[str]:
    lines = ["## The 130M Conformer and conformer_large, from the plan alone", ""]
    lines += _meta(entry)
    lines += [
        "`benchmarks/plan_sizes.py` (models built with SpeechBrain's lobes on the",
        "`meta` device, plans by `make_plan`; weights-only quantization, per-variable",
        "scale, partial quantization with the random policy re-drawn per client).",
        "Bytes per round are the exact lengths of every client's broadcast (down)",
        "and reply (up). *Server, streaming*: the float32 master, the running sums,",
        "the round's compressed broadcast (each variable compressed once and shared",
        "by the clients), one message and one decoded entry; the same for 100 and",
        "1,000 clients. *Server, before*: the master, every reply decoded to float32",
        "and every message of the round held at once (before streaming).",
        "*Client*: a client's parameter memory under its plan. *Saving*: of the",
        f"float32 parameter memory and communication; the paper reports {PAPER}.",
        "",
    ]
    for preset, data in entry["result"].items():
        shape = data["shape"]
        lines += [
            f"### {preset}: {data['parameters']:,} parameters "
            f"({data['parameters'] * 4 / 2**20:,.0f} MiB in float32)",
            "",
            f"d_model {shape['d_model']}, {shape['nhead']} heads, {shape['layers']} "
            f"conformer layers, FFN {shape['d_ffn']}, kernel {shape['kernel_size']}, "
            f"CTC head of {shape['vocab']} outputs.",
            "",
        ]
        rows = []
        for row in data["rows"]:
            a, b = row["100"], row["1000"]
            client = a["client_parameter_bytes"]
            saving = 1 - client / a["client_float32_bytes"]
            bits = 32 * client / a["client_float32_bytes"]
            mark = (
                " **(paper's setting)**"
                if (row["format"] == "e3m7" and row["fp32_fraction"] == 0.1)
                else ""
            )
            rows.append(
                [
                    row["format"] + mark,
                    f"{100 * row['fp32_fraction']:.0f} %",
                    f"{bits:.2f}",
                    f"{100 * saving:.1f} %",
                    _mib(a["largest_message"]),
                    f"{_gib(a['bytes_down'])} / {_gib(a['bytes_up'])}",
                    f"{_gib(b['bytes_down'])} / {_gib(b['bytes_up'])}",
                    _mib(sum(a["server_streaming"].values())),
                    f"{_gib(sum(a['server_before'].values()))} / "
                    f"{_gib(sum(b['server_before'].values()))}",
                    _mib(client),
                ]
            )
        lines += _table(
            [
                "format",
                "float32 fraction",
                "bits per value",
                "saving",
                "message MiB",
                "GiB per round down / up, 100 clients",
                "GiB per round down / up, 1,000 clients",
                "server, streaming MiB",
                "server, before GiB (100 / 1,000)",
                "client MiB",
            ],
            rows,
        )
        e3m7 = next(
            r
            for r in data["rows"]
            if r["format"] == "e3m7" and r["fp32_fraction"] == 0.1
        )
        parts = e3m7["100"]["server_streaming"]
        ours = (
            1
            - e3m7["100"]["client_parameter_bytes"]
            / (e3m7["100"]["client_float32_bytes"])
        )
        down = 1 - e3m7["100"]["bytes_down"] / e3m7["100"]["float32_bytes_down"]
        lines += [
            "",
            f"Beside the paper: its setting (e3m7, 10 % of the weight values float32)"
            f" saves {100 * ours:.1f} % of a client's parameter memory and "
            f"{100 * down:.1f} % of the bytes down for this model; the paper "
            f"reports {PAPER}.",
            "Server with streaming aggregation, e3m7 with 10 % float32, in MiB: "
            + ", ".join(f"{k} {_mib(v)}" for k, v in parts.items())
            + " (add one model for FedAvgM's momentum).",
            "",
        ]
    return lines


def _deployment(entry: dict) -> list[str]:
    data = entry["result"]
    lines = [
        "## Flower Deployment Engine: one round of a conformer_large-sized model",
        "",
    ]
    lines += _meta(entry)
    lines += [
        "`fed_omc.yaml` with conformer_large's shape (d_model 512, 8 heads, 12",
        "layers, FFN 2048, kernel 31, 80 mel bins), a SuperLink and two SuperNodes",
        "on 127.0.0.1 (each one client of three utterances, one SGD step), one",
        "round, no federated evaluation. Peak RSS: each process's `VmHWM`, sampled",
        "every 0.1 s (several values: one per process of that program).",
        "",
        f"- Parameters: {data['parameters']:,} ({_mib(data['model_float32_bytes'])} "
        "MiB in float32).",
        f"- Bytes down {data['bytes_down']:,} ({_mib(data['bytes_down'])} MiB, "
        f"float32 {_mib(data['float32_bytes_down'])} MiB), up {data['bytes_up']:,} "
        f"({_mib(data['bytes_up'])} MiB, float32 {_mib(data['float32_bytes_up'])} "
        "MiB), for two clients.",
        f"- Accepted {data['accepted']}; rejected {data['rejected'] or 'none'}.",
        f"- Round {data['round_seconds']:.1f} s (server: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in data["server_seconds"].items())
        + f"); the whole run {data['run_seconds']:.0f} s (processes started, "
        "nodes connected, ServerApp built its model, final test).",
        "- Server process RSS during the round: before "
        f"{_mib(data['server_rss']['before'])} MiB, peak "
        f"{_mib(data['server_rss']['peak'])} MiB.",
        "",
    ]
    rows = [
        [program, ", ".join(_mib(p) for p in peaks)]
        for program, peaks in sorted(data["peak_rss"].items())
    ]
    lines += _table(["process", "peak RSS MiB"], rows)
    lines.append("")
    return lines


def render(record: dict) -> str:
    """The Markdown record.

    Arguments
    ---------
    record : dict
        ``benchmarks/results/federated_scale.json``.

    Returns
    -------
    str
    """
    lines = [
        "# Federation at scale: streaming aggregation, a thousand clients, 130M",
        "",
        "Recorded by `benchmarks/federated_scale.py` (see its docstring; rerun",
        "any part with `--parts`).",
        "",
    ]
    measured = sorted(
        (record[k] for k in record if k.startswith("measured_")),
        key=lambda e: (
            e["result"]["runner"],
            _window(e["result"]),
            e["result"]["clients_per_round"],
        ),
    )
    if measured:
        lines += _measured(measured)
    if "analytic" in record:
        lines += _analytic(record["analytic"])
    if "deployment" in record:
        lines += _deployment(record["deployment"])
    return "\n".join(lines).rstrip() + "\n"
