"""The paper recipes' data: no recipe trains on a dataset split it evaluates on, and the Mistral
recipe's prompt mapping gives BeaverTails and Alpagasus rows the labels, prompts and original
responses the paper used (read offline: the Hub sources are swapped for local rows of their shape)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, load_script
from safecot.config import load_recipe, section_config
from safecot.prompt_sets import load_prompt_sources, prompt_sources
from safecot.suites import suite_spec

RECIPES = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if {"generate", "eval"} <= set(load_recipe(p))]


def dataset(source: str, split: str, subset: str | None) -> tuple:
    """What identifies the rows: a Hub dataset by id, config and split; a file by its path."""
    return (source, subset, split) if source.startswith("hf:") else (str((ROOT / source).resolve()),)


def overlap(recipe: Path, *overrides: str) -> set:
    r = load_recipe(recipe, list(overrides))
    gen = section_config(r, "generate", load_script("01_generate").Config)
    ev = section_config(r, "eval", load_script("05_eval").Config)
    train = {dataset(s["source"], s["split"], s["subset"])
             for s in prompt_sources(gen.prompts, gen.prompt_split, gen.prompt_subset)}
    evaluated = {dataset(s.source, s.split, s.subset) for s in map(suite_spec, ev.suites)}
    return train & evaluated


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_no_recipe_trains_on_a_split_it_evaluates_on(recipe):
    assert overlap(recipe) == set()


def test_the_check_sees_a_shared_split():
    assert ROOT / "configs/mistral-7b.yaml" in RECIPES
    shared = overlap(ROOT / "configs/mistral-7b.yaml",
                     'generate.prompts=[{source: "hf:PKU-Alignment/BeaverTails", split: 30k_test}]')
    assert shared == {("hf:PKU-Alignment/BeaverTails", None, "30k_test")}


def test_mistral_recipe_maps_beavertails_and_alpagasus_as_the_paper(tmp_path):
    local = {"hf:PKU-Alignment/BeaverTails": tmp_path / "beavertails.jsonl", "hf:mlabonne/alpagasus": tmp_path / "alpagasus.jsonl"}
    local["hf:PKU-Alignment/BeaverTails"].write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How can I steal a car?", "response": "Hotwire it.", "is_safe": False,
         "category": {"animal_abuse": False, "non_violent_unethical_behavior": True}},
        {"prompt": "How can I steal a car?", "response": "I can't help.", "is_safe": True,
         "category": {"animal_abuse": False, "non_violent_unethical_behavior": False}},
        {"prompt": "What do cats eat?", "response": "Cat food.", "is_safe": True, "category": {"animal_abuse": False}}]))
    local["hf:mlabonne/alpagasus"].write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Summarise the following text.", "input": "Rain falls when clouds cool.", "output": "Cool clouds rain."},
        {"instruction": "Name three fruits.", "input": "", "output": "Apple, pear, fig."}]))
    gen = section_config(load_recipe(ROOT / "configs/mistral-7b.yaml"), "generate", load_script("01_generate").Config)
    specs = prompt_sources(gen.prompts, gen.prompt_split, gen.prompt_subset)
    assert {s["source"] for s in specs} == set(local)
    rows = load_prompt_sources([{**s, "source": str(local[s["source"]])} for s in specs])
    assert [(r["prompt"], r["label"], r["category"], r["original_response"]) for r in rows] == [
        ("How can I steal a car?", "harmful", "non_violent_unethical_behavior", "Hotwire it."),  # first row of the prompt
        ("What do cats eat?", "benign", "none", "Cat food."),
        ("Summarise the following text.\n\nRain falls when clouds cool.", "benign", "general", "Cool clouds rain."),
        ("Name three fruits.", "benign", "general", "Apple, pear, fig.")]
