"""The recipes and sample that ship with curate: inside the package once installed (curate/recipes, curate/data),
at the top of a checkout (recipes/, data/). A bundled recipe names the sample as ../data/sample/..., true in both."""

from __future__ import annotations

import shutil
from pathlib import Path

from curate.errors import UserError

_HERE = Path(__file__).resolve().parent
STARTER = "starter"


def folder(name: str) -> Path:
    """`recipes` or `data`: the installed package's copy, else the checkout's."""
    inside = _HERE / name
    return inside if inside.is_dir() else _HERE.parent / name


def recipe_names() -> list[str]:
    return sorted(path.stem for path in folder("recipes").glob("*.yaml"))


def resolve_recipe(argument: Path) -> Path:
    """A recipe file as given, else the bundled recipe of that name (`curate run metis_sft`)."""
    if argument.exists() or argument.suffix or len(argument.parts) > 1:
        return argument
    bundled = folder("recipes") / f"{argument}.yaml"
    if bundled.is_file():
        return bundled
    raise UserError(f"recipe not found: {argument} is no file and no bundled recipe ({', '.join(recipe_names())})")


def init(target: Path) -> tuple[Path, Path]:
    """`target`/recipe.yaml (the starter recipe) and `target`/sample (the bundled sample it reads), to edit;
    nothing that exists is overwritten."""
    recipe, sample = target / "recipe.yaml", target / "sample"
    for path in (recipe, sample):
        if path.exists():
            raise UserError(f"{path} exists; `curate init` writes only new files: choose another folder")
    text = (folder("recipes") / f"{STARTER}.yaml").read_text(encoding="utf-8")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder("data") / "sample", sample)
    recipe.write_text(text.replace("../data/sample/", "sample/"), encoding="utf-8")
    return recipe, sample
