"""`pgolf recipes`: the named recipes with their provenance, and one recipe's full config against `record`."""

import json

from pgolf.config import ConfigError, config_to_dict
from pgolf.recipes import RECIPES, get_recipe

REFERENCE_RECIPE = "record"


def add_recipes_commands(subparsers) -> None:
    p = subparsers.add_parser("recipes", help="list the named recipes, or show one recipe's config",
                              description="Without NAME: every recipe with its one-line provenance. With NAME: "
                                          "its full config, then the fields where it differs from record.")
    p.add_argument("name", nargs="?", metavar="NAME", help="a recipe to show")
    p.set_defaults(func=cmd_recipes)


def recipe_summary(name: str) -> str:
    """The first line of a recipe function's docstring."""
    doc = (RECIPES[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def flat_recipe_config(name: str) -> dict:
    """{"section.field": value} of a recipe's config (bookkeeping at the top level keeps its own name)."""
    flat = {}
    for key, value in config_to_dict(get_recipe(name)).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            flat[key] = value
    return flat


def recipe_differences(name: str, reference: str = REFERENCE_RECIPE) -> list[tuple[str, object, object]]:
    """(key, reference's value, this recipe's value) for every field that differs, `recipe` left out."""
    ours, theirs = flat_recipe_config(name), flat_recipe_config(reference)
    return [(key, theirs[key], value) for key, value in ours.items() if key != "recipe" and theirs[key] != value]


def format_recipe(name: str) -> str:
    lines = [f"recipe {name}: {recipe_summary(name)}", "", "config:"]
    lines += [f"  {key} = {json.dumps(value)}" for key, value in flat_recipe_config(name).items()]
    diffs = recipe_differences(name)
    lines += ["", f"differences from {REFERENCE_RECIPE} ({len(diffs)}):"]
    rows = [("key", REFERENCE_RECIPE, name)] + [(key, json.dumps(ref), json.dumps(value)) for key, ref, value in diffs]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines += [f"  {key:<{widths[0]}}  {ref:<{widths[1]}}  {value}" for key, ref, value in rows] if diffs else ["  none"]
    return "\n".join(lines)


def cmd_recipes(args) -> int:
    if args.name is None:
        width = max(len(name) for name in RECIPES)
        for name in RECIPES:
            print(f"{name:<{width}}  {recipe_summary(name)}")
        return 0
    if args.name not in RECIPES:
        raise ConfigError(f"unknown recipe {args.name!r}; valid: {', '.join(RECIPES)}")
    print(format_recipe(args.name))
    return 0
