"""The paper's evaluation settings as named presets of the model arguments.

Source: the official repository's lm-eval scripts for LLaDA-8B-Base (`eval_llada.sh`, the
settings its EVAL.md documents): likelihood tasks with the Monte Carlo bound (`mc_num` samples,
unsupervised classifier-free guidance `cfg`), generation tasks with one token per step over one
block (`gen_length` = `steps` = `block_length` = 1024), no EOS option (the reference sampler's
defaults: EOS neither forbidden nor given confidence 0). The few-shot count is lm-eval's
`--num_fewshot`, not a model argument: it is listed here for the README and `--help`.
"""

# name: (model args, num_fewshot, tasks)
PRESETS = {
    # conditional likelihood (multiple choice)
    "gpqa": ({"mc_num": 128, "cfg": 0.5}, 5, "gpqa_main_n_shot"),
    "truthfulqa": ({"mc_num": 128, "cfg": 2.0}, 0, "truthfulqa_mc2"),
    "arc_challenge": ({"mc_num": 128, "cfg": 0.5}, 0, "arc_challenge"),
    "hellaswag": ({"mc_num": 128, "cfg": 0.5}, 0, "hellaswag"),
    "winogrande": ({"mc_num": 128, "cfg": 0.0}, 5, "winogrande"),
    "piqa": ({"mc_num": 128, "cfg": 0.5}, 0, "piqa"),
    # single-token answers: the bound is exact with one sample
    "mmlu": ({"mc_num": 1, "cfg": 0.0}, 5, "mmlu"),
    "cmmlu": ({"mc_num": 1, "cfg": 0.0}, 5, "cmmlu"),
    "ceval": ({"mc_num": 1, "cfg": 0.0}, 5, "ceval-valid"),
    # conditional generation: one token per step, one block
    "bbh": ({"gen_length": 1024, "steps": 1024, "block_length": 1024}, None, "bbh"),
    "gsm8k": ({"gen_length": 1024, "steps": 1024, "block_length": 1024}, None, "gsm8k"),
    "math": ({"gen_length": 1024, "steps": 1024, "block_length": 1024}, None, "minerva_math"),
    "humaneval": ({"gen_length": 1024, "steps": 1024, "block_length": 1024}, None, "humaneval"),
    "mbpp": ({"gen_length": 1024, "steps": 1024, "block_length": 1024}, None, "mbpp"),
}


def preset(name):
    """The model arguments of a preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ValueError(
            f"preset={name!r} is not a preset of llada-lm-eval (known: {', '.join(sorted(PRESETS))})"
        )
    return dict(PRESETS[name][0])
