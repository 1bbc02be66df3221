"""Use your personalized model on your device: score text or generate it, offline.

The device keeps, under its state folder (see client/personal.py), the newest shared adapter the
server sent (``shared/``) and the user's private adapter (``personal/``), both in peft's format and
tagged with the base's content hash and the federation method. This command rebuilds the user's model
as that method defines it (shared/methods.py): for ``dual`` the shared and personal adapters stacked,
for ``ditto``/``local``/``fedavg-ft`` the personal one, for ``fedavg``/``domain`` the shared one, for
``fedsa`` the global A with the device's own B.

    python -m client.use score    --state-dir ~/.fedgraft/devices --user "macbeth/LADY MACBETH" --file my.txt
    python -m client.use generate --state-dir ~/.fedgraft/devices --user "macbeth/LADY MACBETH" --prompt "My lord,"

``--base`` defaults to the base the adapters were trained on (from their tag); the base's weights are
hashed and checked against the tag before anything runs. ``--device`` (auto, cpu, cuda; default auto:
the GPU when there is one) is where the model runs. Adapters trained on an emulator base run on
its teacher with ``--on-teacher`` (``--teacher`` names another copy of it; shared/plugin.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table

from client.personal import CACHE, PEFT_WEIGHTS, TAG_FILE, StalePersonalAdapter, user_folder
from shared.base_model import BaseModelError, base_layout, load_model, load_tokenizer, weights_hash
from shared.device import DEVICES, Device, model_device, resolve_device
from shared.methods import PERSONAL, SHARED, method
from shared.plugin import NotPluggable, plug_into_teacher
from shared.retrieval import CacheSetting, Datastore, evaluate_with_cache
from shared.training import evaluate, tokenize_blocks

console = Console()

class NoSavedAdapter(FileNotFoundError):
    """The state folder holds no adapter for this user."""


@dataclass
class PersonalModel:
    """The base with the user's saved adapters loaded; ``adapters`` is what the method stacks."""

    model: PeftModel
    tokenizer: object
    adapters: list[str]
    saved: list[str]
    tag: dict
    runs_on: str  # the base spec the model runs on: the one trained on, or the emulator's teacher
    cache: tuple[Datastore, CacheSetting] | None = None  # a retrieval method's kNN cache, on the base it was built on

    def use(self, adapters: list[str] | None) -> None:
        """Make these adapters active (None: the base alone, adapters disabled)."""
        if adapters:
            self.model.base_model.enable_adapter_layers()
            self.model.base_model.set_adapter(adapters)
        else:
            self.model.base_model.disable_adapter_layers()


def read_tags(folder: Path) -> dict[str, dict]:
    """The tag of each adapter saved in a user's folder, by adapter name."""
    tags = {}
    for adapter in (SHARED, PERSONAL):
        if (folder / adapter / PEFT_WEIGHTS).is_file():
            tag_file = folder / adapter / TAG_FILE
            tags[adapter] = json.loads(tag_file.read_text()) if tag_file.is_file() else {}
    return tags


def load_personal_model(folder: Path, base: str | None = None, dtype: str | None = None, on_teacher: bool = False,
                        teacher: str | None = None, device: Device = Device.AUTO) -> PersonalModel:
    """Load the base and the adapters saved in ``folder`` onto ``device``; refuse adapters trained on another base.

    ``on_teacher``: the adapters were trained on an emulator base; run them on its teacher (the one
    its layout names, or ``teacher``) instead. DeviceUnavailable, before anything loads, for a
    ``cuda`` this machine does not have.
    """
    where = resolve_device(device)
    tags = read_tags(folder)
    if not tags:
        raise NoSavedAdapter(f"no saved adapter in {folder} (expected {SHARED}/ or {PERSONAL}/ with "
                             f"{PEFT_WEIGHTS}); has this device taken part in a round yet?")
    newest = max(tags.values(), key=lambda tag: tag.get("saved_at", 0.0))
    base = base or newest.get("base_model")
    if not base:
        raise BaseModelError(f"the adapters in {folder} do not name their base; pass --base")
    dtype = dtype or newest.get("base_dtype", "float32")
    model = load_model(base, dtype)
    require_trained_on(model, base, tags, folder)
    saved = list(tags)
    folders = {adapter: folder / adapter for adapter in saved}
    runs_on = base
    with tempfile.TemporaryDirectory() as plugged:
        if on_teacher:
            layout = base_layout(base)
            if layout is None:
                raise NotPluggable(f"{base!r} is not an emulator base: its adapters run only on it")
            runs_on = teacher or layout.teacher
            model = load_model(runs_on, dtype)
            folders = {adapter: plug_into_teacher(source, Path(plugged) / adapter, layout, runs_on)
                       for adapter, source in folders.items()}
        peft_model = PeftModel.from_pretrained(model, folders[saved[0]], adapter_name=saved[0])
        for adapter in saved[1:]:
            peft_model.load_adapter(folders[adapter], adapter_name=adapter)
    peft_model.to(where)
    peft_model.eval()
    method_ = method(newest.get("method", "fedavg"))
    adapters = [adapter for adapter in method_.user_adapters if adapter in saved] or saved
    # the cache's keys are hidden states of the model it was built on: they mean nothing to a teacher
    cache = load_cache(folder, newest.get("base_hash", "")) if method_.retrieval and not on_teacher else None
    return PersonalModel(peft_model, load_tokenizer(runs_on), adapters, saved, newest, runs_on, cache)


def load_cache(folder: Path, base_hash: str) -> tuple[Datastore, CacheSetting] | None:
    """The user's kNN cache, if the device has built one; refused when built on another base."""
    if not (folder / CACHE).is_dir():
        return None
    store, setting, tags = Datastore.load(folder / CACHE)
    if tags.get("base_hash") != base_hash:
        raise StalePersonalAdapter(f"the kNN cache in {folder / CACHE} was built on base "
                                   f"{str(tags.get('base_hash'))[:12]}..., not on this one ({base_hash[:12]}...)")
    return store, setting


def require_trained_on(model: torch.nn.Module, base: str, tags: dict[str, dict], folder: Path) -> None:
    """Refuse adapters whose tag names a base other than the weights of ``model``."""
    local_hash = weights_hash(model)
    for adapter, tag in tags.items():
        if tag.get("base_hash") != local_hash:
            raise StalePersonalAdapter(
                f"the adapter in {folder / adapter} was trained on base {str(tag.get('base_hash'))[:12]}..., "
                f"but {base!r} loads as {local_hash[:12]}...; pass the base (and --dtype) it was trained on")


def score(personal: PersonalModel, texts: list[str], seq_len: int = 128) -> list[tuple[str, dict[str, float]]]:
    """Perplexity and next-token accuracy of the text under the base, the shared adapter and the user's model."""
    blocks = tokenize_blocks(personal.tokenizer, texts, seq_len)
    variants: list[tuple[str, list[str] | None]] = [("base alone", None)]
    if SHARED in personal.saved and personal.adapters != [SHARED]:
        variants.append(("shared adapter", [SHARED]))
    variants.append(("your model (" + " + ".join(personal.adapters) + ")", personal.adapters))
    results = []
    with torch.no_grad():
        for label, adapters in variants:
            personal.use(adapters)
            results.append((label, evaluate(personal.model, blocks, batch_size=4)))
        if personal.cache is not None:
            store, setting = personal.cache
            results.append((f"your model + kNN cache (weight {setting.weight:g}, {len(store)} keys)",
                            evaluate_with_cache(personal.model, store, blocks, setting, batch_size=4)))
    personal.use(personal.adapters)
    return results


def generate(personal: PersonalModel, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0) -> str:
    """Continue the prompt with the user's model (sampling; temperature 0 is greedy)."""
    personal.use(personal.adapters)
    torch.manual_seed(seed)
    inputs = personal.tokenizer(prompt, return_tensors="pt").to(model_device(personal.model))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = personal.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                         pad_token_id=personal.tokenizer.pad_token_id, **sampling)
    return personal.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.use", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("score", "perplexity of your text under the base, the shared adapter and your model"),
                       ("generate", "continue a prompt with your model")):
        command = commands.add_parser(name, help=text)
        where = command.add_mutually_exclusive_group(required=True)
        where.add_argument("--folder", type=Path, help="the user's state folder itself")
        where.add_argument("--state-dir", type=Path, help="the device's state folder (node-config state-dir)")
        command.add_argument("--user", help="the user id under --state-dir, e.g. 'macbeth/LADY MACBETH'")
        command.add_argument("--base", help="base spec or folder (default: the one named in the adapters' tag)")
        command.add_argument("--dtype", help="base dtype (default: the one the adapters were trained with)")
        command.add_argument("--device", choices=DEVICES, default=Device.AUTO.value,
                             help="where the model runs: auto (the GPU when there is one), cpu or cuda")
        command.add_argument("--on-teacher", action="store_true",
                             help="run adapters trained on an emulator base on its teacher instead")
        command.add_argument("--teacher", help="the teacher's spec or folder (default: the one the emulator names); "
                             "implies --on-teacher")
    score_command, generate_command = commands.choices["score"], commands.choices["generate"]
    text = score_command.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="text to score")
    text.add_argument("--file", type=Path, help="a text file to score (one passage per blank-line-separated paragraph)")
    generate_command.add_argument("--prompt", required=True)
    generate_command.add_argument("--max-new-tokens", type=int, default=60)
    generate_command.add_argument("--temperature", type=float, default=0.8)
    generate_command.add_argument("--top-p", type=float, default=0.95)
    generate_command.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.state_dir is not None and not args.user:
        parser.error("--state-dir needs --user")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.folder or user_folder(args.state_dir, args.user)
    try:
        personal = load_personal_model(folder, args.base, args.dtype, args.on_teacher or bool(args.teacher),
                                       args.teacher, Device(args.device))
        if args.command == "score":
            texts = [args.text] if args.text is not None else [p for p in args.file.read_text().split("\n\n") if p.strip()]
            if not texts:
                raise ValueError(f"nothing to score in {args.file}")
            table = Table(title=f"{folder.name}: method {personal.tag.get('method')}, round {personal.tag.get('round')}, "
                                f"on {personal.runs_on}")
            for column in ("model", "perplexity", "accuracy", "tokens"):
                table.add_column(column, justify="left" if column == "model" else "right")
            for label, result in score(personal, texts):
                table.add_row(label, f"{result['perplexity']:.2f}", f"{result['accuracy']:.3f}", f"{result['tokens']:.0f}")
            console.print(table)
        else:
            console.print(f"[dim]{folder.name}: {' + '.join(personal.adapters)} on {personal.runs_on}[/]")
            console.print(args.prompt + generate(personal, args.prompt, args.max_new_tokens, args.temperature,
                                                 args.top_p, args.seed), markup=False, highlight=False)
    except (OSError, ValueError, BaseModelError, StalePersonalAdapter) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
