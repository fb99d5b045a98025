#!/usr/bin/env python3
"""Read a vlmtune TensorBoard events file with TensorBoard's own EventAccumulator, print its scalars and check them
against the run's vis_data/scalars.json (the same values, as float32).

    python3 tools/check_tensorboard.py work_dirs/NAME/TIMESTAMP           # a run folder
    python3 tools/check_tensorboard.py work_dirs/NAME/TIMESTAMP/vis_data/events.out.tfevents.1764580000.host

Needs `pip install tensorboard` (nothing else). Exit code 0 when TensorBoard reads every scalar of scalars.json back,
1 when something is missing or different, 2 on bad arguments.
"""
import argparse
import glob
import json
import math
import os
import sys

TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s"}


def events_path(path):
    """The events file named, or the one in a run folder's vis_data/ (or in the folder itself)."""
    if os.path.isfile(path):
        return path
    for folder in (os.path.join(path, "vis_data"), path):
        found = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            sys.exit(f"{folder}: {len(found)} events files; name one")
    sys.exit(f"{path}: no events.out.tfevents.* file (was the run trained with report_to: tensorboard?)")


def expected_scalars(scalars_path):
    """{(tag, step): value} from scalars.json, as the trainer logged them."""
    expected = {}
    with open(scalars_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            step = row["iter"]
            if "eval_loss" in row and "loss" not in row:
                if row["eval_loss"] is not None:
                    expected[("eval/loss", step)] = row["eval_loss"]
                continue
            for key, tag in TAGS.items():
                if row.get(key) is not None:
                    expected[(tag, step)] = row[key]
    return expected


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an events file, a run folder or its vis_data/ folder")
    parser.add_argument("--scalars", help="scalars.json to compare with (default: the one beside the events file)")
    args = parser.parse_args()

    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    path = events_path(args.path)
    accumulator = EventAccumulator(path, size_guidance={SCALARS: 0})   # 0: keep every value, no sampling
    accumulator.Reload()
    print(f"{path}: file_version {accumulator.file_version}")
    tags = sorted(accumulator.Tags()["scalars"])
    if not tags:
        print("no scalars", file=sys.stderr)
        return 1
    read = {}
    for tag in tags:
        for event in accumulator.Scalars(tag):
            read[(tag, event.step)] = event.value
            print(f"{tag}\tstep {event.step}\t{event.value:.7g}\twall_time {event.wall_time:.3f}")

    scalars_path = args.scalars or os.path.join(os.path.dirname(path), "scalars.json")
    if not os.path.isfile(scalars_path):
        print(f"{scalars_path} not found: printed only, nothing compared")
        return 0
    expected = expected_scalars(scalars_path)
    problems = []
    for (tag, step), value in sorted(expected.items()):
        got = read.get((tag, step))
        if got is None:
            problems.append(f"{tag} at step {step}: missing (scalars.json has {value})")
        elif not math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-30):   # float32 in the events file
            problems.append(f"{tag} at step {step}: {got} in the events file, {value} in scalars.json")
    for key in sorted(set(read) - set(expected)):
        problems.append(f"{key[0]} at step {key[1]}: in the events file only")
    if accumulator.file_version != 2.0:   # TensorBoard parses "brain.Event:2" into the number 2.0
        problems.append(f"file_version is {accumulator.file_version!r}, expected 2.0 ('brain.Event:2')")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(expected)} scalars of {scalars_path} compared: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
