"""What the `--external_plugins` plugin does inside ms-swift 4.6's argument parsing.

How ms-swift 4.6 parses (`swift rlhf ...` runs `swift/cli/rlhf.py` -> `rlhf_main()` ->
`SwiftPipeline._parse_args`): `HfArgumentParser.parse_args_into_dataclasses(argv,
return_remaining_strings=True)` first splits argv with argparse into known values and
`remaining_args`, then constructs `RLHFArguments`, whose `__post_init__` imports the
`--external_plugins` files; after it returns, any remaining string is a
`ValueError: remaining_argv` (unless `ignore_args_error`). A YAML config
(`swift rlhf cfg.yaml`) is turned into flags first, nested mappings as JSON strings.

So when the plugin runs, kdcompose's flags (`--loss_terms`, `--llm_kd_weight`,
`--visual_kd`) are sitting in `remaining_args`, and the half-built `RLHFArguments` is the
`self` of the `__post_init__` frames above us. `activate_plugin` finds both on the call
stack, takes our flags out of `remaining_args` in place (so ms-swift's check passes and
sees only real leftovers, which we report with a close-match suggestion), resolves the
composition with the GKD knobs the user gave explicitly, checks the teacher and the
unsupported settings and where the run starts (`resume_point`: `KDCOMPOSE_RESUME=1`, an
incomplete `--resume_from_checkpoint` refused) before any model is loaded, parks the
composition for the trainer and attaches it (and `llm_kd_weight`) to the arguments, which
ms-swift saves in args.json. Where no parse is in progress (a dataloader worker replaying the
plugin import, or `RLHFArguments(external_plugins=...)` built in Python) it only selects the
trainer.

This relies on the names of two locals in transformers' `HfArgumentParser` and ms-swift's
plugin import order; the tested versions are pinned (`runtime.TESTED_RANGE`) and a test
runs the real `swift rlhf` command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from kdcompose.compat.swift_argv import find_parse_in_progress
from kdcompose.composer import LossComposer, build_composer
from kdcompose.composition import Composition
from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.resolve import parse_gkd_knobs, resolve_composition

OWN_FLAGS: dict[str, str] = {
    "loss_terms": "rlhf.loss_terms",
    "llm_kd_weight": "rlhf.llm_kd_weight",
    "visual_kd": "custom.visual_kd",
}
"""kdcompose's flags and the dotted config path the composition resolver reports them under."""
KNOB_FLAGS: tuple[str, ...] = ("beta", "temperature", "sft_alpha", "gkd_logits_topk")
SOURCE = "swift rlhf command line"


def parse_flag_value(text: str) -> Any:
    """A flag's value as ms-swift hands it over: JSON (mappings, numbers), else YAML, else text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def take_own_flags(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split argv into kdcompose's flags (parsed values) and everything else, in order.

    Accepts `--name value`, `--name=value` and the dashed spelling `--llm-kd-weight`.
    """
    own: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_value, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key not in OWN_FLAGS:
            rest.append(token)
            i += 1
            continue
        if has_value:
            text, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            text, i = argv[i + 1], i + 2
        else:
            raise ConfigError.single(f"--{key}", "needs a value, e.g. --llm_kd_weight 0.5", source=SOURCE)
        if key in own:
            raise ConfigError.single(f"--{key}", "is given twice; give it once", source=SOURCE)
        own[key] = parse_flag_value(text)
    return own, rest


def _flag_path(path: str) -> str:
    for key, dotted in OWN_FLAGS.items():
        if path == dotted or path.startswith(dotted + "."):
            return "--" + key + path[len(dotted) :]
    return path


def _as_flag_issues(issues: Sequence[ConfigIssue]) -> list[ConfigIssue]:
    return [ConfigIssue(_flag_path(i.path), i.message) for i in issues]


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """Names of the flags present in argv (`--beta 0.3` -> `beta`)."""
    return {t[2:].partition("=")[0].replace("-", "_") for t in argv if t.startswith("--")}


def resolve_from_flags(own: Mapping[str, Any], arguments: Any, given: set[str]) -> Composition:
    """The composition from kdcompose's flags plus the GKD knobs the user set explicitly."""
    issues: list[ConfigIssue] = []
    knob_values = {k: getattr(arguments, k, None) for k in KNOB_FLAGS if k in given}
    knobs = parse_gkd_knobs(knob_values, {k: f"--{k}" for k in KNOB_FLAGS}, issues)
    composition = resolve_composition(
        own.get("loss_terms"), own.get("llm_kd_weight"), own.get("visual_kd"), knobs, issues
    )
    if issues or composition is None:
        raise ConfigError(_as_flag_issues(issues) or [ConfigIssue("--loss_terms", "invalid")], source=SOURCE)
    return composition


def check_arguments(composer: LossComposer, arguments: Any) -> None:
    """rlhf_type, teacher and unsupported settings, on the half-built `RLHFArguments`."""
    from kdcompose.integrations.swift.launch.preflight import SETTINGS_READ, setting_issues

    values = {k: getattr(arguments, k, None) for k in SETTINGS_READ}
    issues = setting_issues(values, composer, {k: f"--{k}" for k in values})
    if issues:
        raise ConfigError(issues, source=SOURCE)


def unknown_flag_issues(remaining: Sequence[str]) -> list[ConfigIssue]:
    from kdcompose.integrations.swift.launch.arg_names import swift_argument_names
    from kdcompose.integrations.swift.launch.args import suggest

    known = [*swift_argument_names(), *OWN_FLAGS]
    issues = []
    for token in remaining:
        if not token.startswith("--"):
            continue
        name = token[2:].partition("=")[0].replace("-", "_")
        issues.append(ConfigIssue(f"--{name}", f"ms-swift does not know this argument{suggest(name, known)}"))
    return issues


def _resume_point(arguments: Any) -> None:
    """Where the run starts (`launch.resume_point`); a finished run exits here, with nothing to train."""
    from kdcompose.integrations.swift.launch.resume_point import apply_to_arguments

    start = apply_to_arguments(arguments)
    if start.message and os.environ.get("RANK", "0") == "0":
        print(f"kdcompose: {start.message}", flush=True)
    if start.finished:
        raise SystemExit(0)


def activate_plugin() -> Composition | None:
    """Everything the plugin file does; returns the composition it handed to the trainer (None:
    none given)."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()
    from kdcompose.integrations.swift.launch.command import record_composition, select_trainer
    from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer, RunComposition

    select_trainer()
    parse = find_parse_in_progress()
    if parse is None:
        return None
    own, rest = take_own_flags(parse.remaining)
    parse.remaining[:] = rest  # ms-swift now sees only the strings that are not ours
    if rest and not getattr(parse.arguments, "ignore_args_error", False):
        issues = unknown_flag_issues(rest)
        if issues:
            raise ConfigError(issues, source=SOURCE)
    KDComposeGKDTrainer.expect(None)
    if not own and getattr(parse.arguments, "rlhf_type", None) != "gkd":
        return None  # not a GKD run: the plugin has nothing to do
    composition = resolve_from_flags(own, parse.arguments, explicit_flags(parse.argv))
    composer = build_composer(composition)
    check_arguments(composer, parse.arguments)  # before ms-swift loads any model
    _resume_point(parse.arguments)  # KDCOMPOSE_RESUME=1; an incomplete checkpoint is refused
    if not own:
        return None  # the trainer composes ms-swift's stock loss from its own arguments
    KDComposeGKDTrainer.expect(RunComposition(composer, {}, "the kdcompose ms-swift plugin"))
    record_composition(parse.arguments, composer)
    print(f"kdcompose: {composer.formula()}", flush=True)
    return composition
