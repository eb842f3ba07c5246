"""`python -m avflow.train`: the torchrun/SLURM entry point stands apart from the command-line tool."""

import subprocess
import sys


def test_the_training_module_does_not_load_the_cli_and_reports_bad_input_in_one_line(tmp_path):
    probe = ("import sys, avflow.train.__main__ as entry; "
             "code = entry.main(['--config', sys.argv[1]]); "
             "print('cli loaded' if 'avflow.cli' in sys.modules else 'cli not loaded'); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout.strip() == "cli not loaded"
    assert done.stderr.strip().splitlines() == [f"python -m avflow.train: error: {tmp_path / 'missing.yaml'}: "
                                                "config file not found"]
