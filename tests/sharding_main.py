"""One training of a diluted tiny ViT through the lambda = 0 switch, in one of three set-ups.

    torchrun --nproc_per_node N tests/sharding_main.py MODE OUT      # MODE: single (N=1) | ddp | fsdp

Two steps diluted (lambda 1, 0.5; a deploy-mode forward), the switch (shrink.training.sharding.
export_for_training), three steps attention-free (under FSDP2 the units are those that the wrap policy of
configs/accelerate/fsdp.yaml picks, through Accelerate's own plugin and policy functions), then the whole model is gathered, exported and
saved. Rank 0 writes OUT/losses.json and OUT/model (shrink.save). The global batch of 16 is split
evenly over the processes, so every set-up computes the same losses.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shrink  # noqa: E402
from shrink.training.sharding import export_for_training, is_sharded, mark_shard_units, whole_model  # noqa: E402

FSDP_YAML = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"


def fsdp_plugin_of(config_file, version: int | None = None):
    """The FSDP plugin that ``accelerate launch --config_file config_file`` gives the training processes:
    the launcher's own environment (FSDP_* variables), read by the plugin as in a launched process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--main_process_port", "0", "x.py"])
    validated = _validate_launch_command(args)
    args = validated[0] if isinstance(validated, tuple) else args
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_")}
    if version is not None:
        env["FSDP_VERSION"] = str(version)
    if version == 1:  # FSDP1 refuses sync_module_states on a CPU
        env["FSDP_SYNC_MODULE_STATES"] = "false"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return FullyShardedDataParallelPlugin()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def units(plugin, model) -> list[str]:
    """What Accelerate's prepare_model would shard as units, by the same calls (FSDP2 or FSDP1)."""
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

        plugin.set_auto_wrap_policy(model)  # fsdp2_prepare_model calls both, in this order
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        return [n for n, m in model.named_modules() if policy(m)]
    plugin.set_auto_wrap_policy(model)
    return [n for n, m in model.named_modules() if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)]


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = shrink.create_model("vit_digits", pretrained=True)
    shrink.dilute(model, [0, 2])
    plugin = fsdp_plugin_of(FSDP_YAML) if mode == "fsdp" else None  # one for the run, as Accelerate's state

    def prepare(m):
        if mode == "ddp":
            m = torch.nn.parallel.DistributedDataParallel(m)
        elif mode == "fsdp":  # the units that the shipped Accelerate config's wrap policy picks, as in training
            from torch.distributed.fsdp import fully_shard

            mark_shard_units(m, plugin)
            chosen = units(plugin, m)
            assert chosen == [f"blocks.{i}" for i in range(len(m.blocks))], chosen
            for name in reversed(chosen):
                fully_shard(m.get_submodule(name))
            fully_shard(m)
        # eps 1e-3: a gradient at fp32 noise level (the key bias, whose true gradient is 0) must not become an
        # lr-sized step whose sign depends on the reduction order; every real gradient here is far larger
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05, eps=1e-3)

    model, opt = prepare(model)
    raw = model.module if mode == "ddp" else model
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(5)]
    per = 16 // world
    losses, deploy = [], None
    for step, (x, y) in enumerate(batches):
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        if step == 2:
            model, raw, opt = export_for_training(raw, opt, prepare)
            assert shrink.attention_free_indices(raw) == [0, 2]
            assert all(opt.state[p]["step"] == 2 for p in raw.parameters()), "optimizer state not carried over"
        elif step < 2:
            shrink.set_lambda(raw, [1.0, 0.5][step])
            if step == 1:
                with torch.no_grad(), shrink.deploy_mode(raw):
                    deploy = model(x).sum()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        for t in (loss.detach(),):
            dist.all_reduce(t)
            losses.append(t.item() / world)
    dist.all_reduce(deploy)
    assert is_sharded(raw) == (mode == "fsdp")
    whole = whole_model(raw)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        shrink.save(shrink.export(whole), out / "model")
        (out / "losses.json").write_text(json.dumps({"losses": losses, "deploy": deploy.item()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
