"""Bad command lines, replayed from a table: each ends with one line on stderr naming the problem and a
non-zero exit, never a traceback; -v shows the traceback."""

import shutil

import pytest
from reliability_inputs import CORPUS, packed, step_directories, tiny_model  # noqa: F401 (fixtures)

from avflow.cli import main

TINY_TRAIN = ["model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.ffn_hidden=32",
              "loader.segment_length=64", "trainer.batch_size=2", "trainer.steps=2", "head_vae.ffn_hidden=8",
              "head_vae.steps=2", "head_vae.segment_length=32", "head_vae.batch_size=2"]


@pytest.fixture(scope="module")
def places(packed, tiny_model, tmp_path_factory):  # noqa: F811
    """Paths the table's command lines refer to."""
    root = tmp_path_factory.mktemp("cli")
    corpus, shards = packed
    (root / "a_file").write_text("not a folder")
    truncated_shards = root / "truncated_shards"
    shutil.copytree(shards, truncated_shards)
    for shard in truncated_shards.glob("*-train-*.tar"):
        shard.write_bytes(shard.read_bytes()[:700])  # every train sample beyond the first header is gone
    step = step_directories(root / "run", tiny_model, steps=(1,))[0]
    (step / ".metadata").write_bytes((step / ".metadata").read_bytes()[:10])
    return {"file": root / "a_file", "corpus": corpus, "shards": shards, "truncated_shards": truncated_shards,
            "model": tiny_model, "truncated_step": step, "root": root}


CASES = [  # (name, command line with {place} fields, what the one line must say)
    ("corpus output under a file", "corpus -o {file}/data", "Not a directory"),
    ("pack output under a file", "pack -i {corpus} -o {file}/shards", "Not a directory"),
    ("train run_dir under a file", "train data.root={corpus} loader.shards={shards} trainer.run_dir={file}/run "
                                   + " ".join(TINY_TRAIN), "Not a directory"),
    ("generate output under a file", "generate --checkpoint {model} --text hi -o {file}/out", "Not a directory"),
    ("infer output under a file", "infer --checkpoint {model} --text hi --no-video -o {file}/out", "Not a directory"),
    ("malformed YAML override", "train trainer.betas=[0.9,",
     "override 'trainer.betas=[0.9,': the value is not valid YAML"),
    ("infinite chunk length", "pack -i {corpus} -o {root}/s data.max_chunk_seconds=.inf",
     "data.max_chunk_seconds: expected a finite number, got inf"),
    ("zero hop length", "train mel.hop_length=0", "mel.hop_length: expected a positive integer, got 0"),
    ("zero head-VAE batch", "train-head-vae head_vae.batch_size=0", "head_vae.batch_size: expected at least 1, got 0"),
    ("negative min_lr_ratio", "train trainer.min_lr_ratio=-3", "trainer.min_lr_ratio: expected in [0, 1], got -3.0"),
    ("negative warmup", "train trainer.warmup_steps=-10", "trainer.warmup_steps: expected non-negative, got -10"),
    ("negative grad_clip", "train trainer.grad_clip=-1", "trainer.grad_clip: expected positive"),
    ("NaN learning rate", "train trainer.lr=.nan", "trainer.lr: expected a finite number, got nan"),
    ("too many bad samples", "train-head-vae loader.shards={truncated_shards} -o {root}/vae.pt",
     "more than loader.max_bad_fraction=0.01"),
    ("truncated checkpoint metadata (generate)", "generate --checkpoint {truncated_step} --text hi -o {root}/g",
     "{truncated_step}/.metadata: 10 bytes"),
    ("truncated checkpoint metadata (consolidate)", "checkpoint consolidate {truncated_step} -o {root}/m.safetensors",
     "{truncated_step}/.metadata: 10 bytes"),
    ("a section set to a value before its keys", "train trainer=5 trainer.lr=1",
     "trainer: expected a mapping of TrainerConfig fields, got 5"),
    ("NaN speaking rate (generate)", "generate --checkpoint {model} --text hi --rate nan -o {root}/g",
     "--rate: expected a positive number, got nan"),
    ("NaN speaking rate (infer)", "infer --checkpoint {model} --text hi --rate nan --no-video -o {root}/i",
     "--rate: expected a positive number, got nan"),
    ("zero pause scale", "generate --checkpoint {model} --text hi --pause-scale 0 -o {root}/g",
     "--pause-scale: expected a positive number, got 0.0"),
    ("zero pack workers", "pack -i {corpus} -o {root}/w --workers 0",
     "--workers: expected at least 1 packing process, got 0"),
]


@pytest.mark.parametrize("command, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_command_line_ends_in_one_line(places, capsys, command, expected):
    argv = command.format(**places).split()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert "Traceback" not in stderr and stderr.count("error: ") == 1, stderr
    assert last.startswith(f"avflow {argv[0]}: error: ") and expected.format(**places) in last, last


def test_verbose_shows_the_traceback(places):
    with pytest.raises(ValueError, match="trainer.grad_clip"):
        main(["-v", "train", "trainer.grad_clip=-1"])


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    def broken(cfg, root):
        raise KeyError("internal")

    monkeypatch.setattr("avflow.data.corpus.write_corpus", broken)
    assert main(["corpus", "-o", "unused"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "KeyError" in error[0] and "-v shows where" in error[0]
