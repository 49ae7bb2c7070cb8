"""`yoloscale launch slurm`: rendering, validation, quoting of hostile values; Slurm -> torch environment mapping."""

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from yoloscale.commands.launch import LAUNCHERS, render_generic, render_sbatch
from yoloscale.errors import UserError

SHIPPED = Path(str(resources.files("yoloscale") / "templates" / "launch" / "slurm"))
# the shipped templates (package data): `yoloscale launch slurm --generic --launcher L --nodes N --gpus-per-node 8 > FILE`
SHIPPED_TEMPLATES = {
    "one-node-8gpu.sbatch": ("srun", 1),
    "multinode-torchrun.sbatch": ("torchrun", 2),
    "multinode-accelerate.sbatch": ("accelerate", 2),
    "deepspeed.sbatch": ("deepspeed", 2),
}

HOSTILE = "$(touch CANARY); `touch CANARY2` 'single' \"double\" ; rm -rf ~\nsecond line"


def _render(tmp_path, *extra, **kw):
    opts = dict(
        nodes=2,
        gpus_per_node=8,
        tasks_per_node=1,
        cpus_per_task=12,
        time_limit="24:00:00",
        partition="gpu",
        account="cv-team",
    )
    opts.update(kw)
    return render_sbatch(None, [f"project={tmp_path}", "name=exp1", "model=yolo11x.yaml", *extra], **opts)


def test_render_has_the_sbatch_lines_and_rendezvous(tmp_path):
    script, run_dir = _render(tmp_path)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=24:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=cv-team",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/exp1-slurm-%j.out",
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
    ):
        assert line in script, line
    assert run_dir == tmp_path / "exp1"


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_rendered_script_is_shellcheck_clean(tmp_path, launcher):
    script, _ = _render(tmp_path, "backend=zero2", launcher=launcher)
    (tmp_path / "s.sbatch").write_text(script)
    proc = subprocess.run(
        ["shellcheck", str(tmp_path / "s.sbatch"), *SHIPPED.glob("*.sbatch")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name", SHIPPED_TEMPLATES)
def test_shipped_templates_are_what_the_renderer_makes(name):
    launcher, nodes = SHIPPED_TEMPLATES[name]
    assert (SHIPPED / name).read_text() == render_generic(launcher, nodes, 8), f"regenerate launch/slurm/{name}"


def _run_with_stand_ins(tmp_path, script: str, *args: str) -> list[str]:
    """Run a generic template under stand-in srun (runs its command as task 1 of node 2), scontrol (two nodes)
    and python3 (records its arguments): what the training launcher would have been started with."""
    bin_dir = _stand_ins(
        tmp_path,
        srun='while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"',
        scontrol="printf 'node1\\nnode2\\n'",
        python3='[[ "$*" == *doctor* ]] && exit 0\nprintf "%s\\0" "$@" > "$ARGS_OUT"',
    )
    (tmp_path / "s.sbatch").write_text(script)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_RESTART_COUNT="1",
        ARGS_OUT=str(tmp_path / "args"),
    )
    subprocess.run(["bash", str(tmp_path / "s.sbatch"), *args], check=True, cwd=tmp_path, env=env)
    return (tmp_path / "args").read_bytes().decode().split("\0")[:-1]


def test_per_node_launchers_get_the_node_rank_and_literal_arguments(tmp_path):
    user = ["my.yaml", f"wandb_project={HOSTILE}", "name=exp1"]
    (tmp_path / "ds").mkdir()
    ds = _run_with_stand_ins(tmp_path / "ds", render_generic("deepspeed", 2, 8), *user)
    assert ds == [
        "-m",
        "deepspeed.launcher.runner",
        "--node_rank=1",
        f"--hostfile={tmp_path}/ds/deepspeed-hostfile-4242",
        "--no_ssh",
        "--master_addr=node1",
        f"--master_port={20000 + 4242}",
        "--module",
        "yoloscale",
        "train",
        *user,
        "resume=auto",
    ]
    assert (tmp_path / "ds" / "deepspeed-hostfile-4242").read_text() == "node1 slots=8\nnode2 slots=8\n"
    (tmp_path / "acc").mkdir()
    acc = _run_with_stand_ins(tmp_path / "acc", render_generic("accelerate", 2, 8), *user)
    assert acc[:4] == ["-m", "accelerate.commands.launch", "--machine_rank=1", "--multi_gpu"]
    assert "--num_processes=16" in acc and acc[-len(user) - 4 :] == ["-m", "yoloscale", "train", *user, "resume=auto"]
    (tmp_path / "tr").mkdir()
    tr = _run_with_stand_ins(tmp_path / "tr", render_generic("torchrun", 2, 8), *user)
    assert tr[:5] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d"]
    assert "--rdzv_endpoint=node1:24242" in tr and tr[-len(user) - 1 :] == [*user, "resume=auto"]
    assert not list(tmp_path.rglob("CANARY*"))


def test_deepspeed_launcher_needs_a_zero_backend_and_gpus(tmp_path):
    with pytest.raises(UserError, match="backend=zero1"):
        _render(tmp_path, launcher="deepspeed")
    with pytest.raises(UserError, match="needs GPUs"):
        _render(tmp_path, "backend=zero2", launcher="deepspeed", gpus_per_node=0)


def _stand_ins(tmp_path, **bodies: str):
    """tmp_path/bin with an executable bash script per name (srun, scontrol, ...), to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in bodies.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_hostile_values_stay_literal(tmp_path):
    """Run the script with stand-in srun/scontrol that record their arguments: the value arrives byte for byte
    and nothing in it runs."""
    script, _ = _render(tmp_path, f"wandb_project={HOSTILE}", gpus_per_node=0, tasks_per_node=2)
    bin_dir = _stand_ins(tmp_path, srun='printf "%s\\0" "$@" > "$ARGS_OUT"', scontrol="echo node1")
    (tmp_path / "s.sbatch").write_text(script)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node1",
        SLURM_CPUS_PER_TASK="1",
        ARGS_OUT=str(tmp_path / "args"),
    )
    subprocess.run(["bash", str(tmp_path / "s.sbatch")], check=True, cwd=tmp_path, env=env)
    args = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    assert f"wandb_project={HOSTILE}" in args
    assert not list(tmp_path.glob("CANARY*"))


@pytest.mark.parametrize(
    "kw, message",
    [(dict(partition="gpu;rm -rf /"), "'partition'"), (dict(time_limit="1 day"), "'time'"), (dict(nodes=0), "'nodes'")],
)
def test_bad_launch_values_are_rejected(tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        _render(tmp_path, **kw)


def test_bad_training_config_is_rejected_before_writing(tmp_path):
    with pytest.raises(UserError, match="unknown key 'epoch'"):
        _render(tmp_path, "epoch=3")


def test_slurm_environment_maps_to_torch():
    from yoloscale.distributed.devices import distributed_env_from_slurm

    env = dict(
        SLURM_PROCID="5",
        SLURM_NTASKS="16",
        SLURM_LOCALID="1",
        SLURM_NTASKS_PER_NODE="8(x2)",
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="node[7-8]",
        MASTER_ADDR="node7",
    )
    distributed_env_from_slurm(env)
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")] == [
        "5",
        "16",
        "1",
        "8",
        str(20000 + 123456 % 20000),
    ]
    env.update(RANK="0", SLURM_PROCID="3")  # a launcher (torchrun, accelerate) already set RANK: left alone
    distributed_env_from_slurm(env)
    assert env["RANK"] == "0"
    outside = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}  # a single task: nothing to do
    distributed_env_from_slurm(outside)
    assert "RANK" not in outside


def test_generic_template_keeps_partition_and_account():
    script = render_generic("torchrun", 2, 8, partition="gpu", account="cv-team")
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --account=cv-team" in script


def test_the_repository_folders_are_what_the_package_ships():
    """ds_configs/ and launch/ at the top of the repository are the source of truth; the package's templates are
    those same files (what a wheel carries: .ci/wheel-smoke.sh installs one and copies them out)."""
    root = Path(__file__).resolve().parents[2]
    shipped = Path(str(resources.files("yoloscale") / "templates"))
    for folder in ("ds_configs", "launch"):
        ours = sorted(p.relative_to(root / folder) for p in (root / folder).rglob("*") if p.is_file())
        theirs = sorted(p.relative_to(shipped / folder) for p in (shipped / folder).rglob("*") if p.is_file())
        assert ours and ours == theirs
        for rel in ours:
            assert (root / folder / rel).read_bytes() == (shipped / folder / rel).read_bytes()
