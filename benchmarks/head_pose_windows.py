"""How far decoding the head latents window by window moves the head pose from decoding the whole sequence at
once, for a trained checkpoint (the head VAE's decoder attends over every frame it is given).

    python benchmarks/head_pose_windows.py --checkpoint runs/demo/checkpoints/step-00001600 --shards shards/demo

Every stage decodes each sampled window's head latents together and cross-fades the poses with the states
(`avflow.model.state.StateDecoder`). Here one sample of the held-out token streams laid end to end is generated
at several lengths, in `generate`'s windows (sample.max_frames/window_overlap) and in `avflow stream`'s default
windows, and its poses are compared with the whole-sequence decode of its cross-faded head latents (what
`generate` wrote before): the largest and the mean |difference| per frame against the pose's range. An input of
one window must give 0: its latents are decoded together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch


def main() -> None:
    from avflow.data.shard_index import iter_split_arrays
    from avflow.infer.generate import conditioning
    from avflow.infer.model import load_inference_model
    from avflow.infer.stream import stream_sample_config
    from avflow.model.sampling import WindowPlan, sample_sequences, sequence_noise

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True, help="the packed shards whose held-out tokens to speak")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_inference_model(args.checkpoint, "cpu")
    cfg, decoder = model.cfg, model.state_decoder
    stream_cfg = stream_sample_config(cfg.sample, cfg.mel.frame_rate, windows_given=False)
    generate_cfg = dataclasses.replace(cfg.sample, num_samples=1)
    window = generate_cfg.max_frames
    cases = [("generate", generate_cfg, length) for length in (window, window + 1, 3000, 5168)]
    cases += [("stream", stream_cfg, length) for length in (stream_cfg.max_frames, stream_cfg.max_frames + 1, 1000,
                                                             3000)]
    pieces, total = [], 0
    while total < max(length for _, _, length in cases):
        for arrays in iter_split_arrays(args.shards, "val", ("tokens",), cfg.loader.max_bad_fraction):
            pieces.append(arrays["tokens"])
            total += arrays["tokens"].shape[0]
    tokens = np.concatenate(pieces)
    rows_out = []
    for name, sample_cfg, length in cases:
        cond = torch.from_numpy(conditioning(model, tokens[:length]))
        runner, frames, buckets, rows, counts = model.sampler(sample_cfg)
        noise = sample_cfg.temperature * sequence_noise(sample_cfg.seed, 1, length, cfg.model.state_dim)
        sampled = sample_sequences(runner, [cond], [noise], frames, sample_cfg.window_overlap, buckets, rows, counts,
                                   window_map=decoder.with_poses)[0]
        windowed = decoder(sampled).head_pose[0]
        whole = decoder.poses(model.codec.decode(sampled[..., :cfg.model.state_dim])["head_latent"])[0].numpy()
        difference, span = np.abs(windowed - whole), float(np.ptp(whole))
        windows = len(WindowPlan(frames, sample_cfg.window_overlap).spans(length))
        row = {"frames": length, "windows_of": name, "window": frames, "overlap": sample_cfg.window_overlap,
               "windows": windows, "max_abs": float(difference.max()), "mean_abs": float(difference.mean()),
               "pose_range": span}
        rows_out.append(row)
        print(f"{length:6d} frames  {name:8s} windows {frames}/{sample_cfg.window_overlap} x{windows:3d}: "
              f"max |windowed - whole| {row['max_abs']:.4g}, mean {row['mean_abs']:.3g} (pose range {span:.3g})",
              flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": args.checkpoint, "rows": rows_out}, handle, indent=1)


if __name__ == "__main__":
    main()
