"""Model cards for steering bundles, rendered from the templates in `hub_cards/`.

The card is written by `save_pretrained` and uploaded with the bundle by `push_to_hub`, so the
Hub never shows a generic card. Its YAML metadata follows the Hub conventions (`library_name`,
`base_model`, `tags`, `pipeline_tag`, `datasets`); PNG plots stored beside the card are embedded.

The card is rendered in memory before anything is written (a config the card cannot show is refused
first) and written through a temp file and a rename, so a symlinked `README.md` (or one in a Hub cache
snapshot) is replaced, never written through. A `README.md` that is not a w2s-hf card (its metadata has
no `library_name: w2s-hf`) is the user's own: it is kept as it is, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCardData

from ..interventions import steering_method
from .config import CONFIG_NAME, BundleError
from .files import save_lock, write_atomic
from .identity import is_hub_id
from .layout import PREDICTOR_PREFIX

if TYPE_CHECKING:
    from .io import SteeringBundle

logger = logging.getLogger(__name__)

LIBRARY_NAME = "w2s-hf"
CARD_NAME = "README.md"


DEFAULT_LICENSE = "apache-2.0"
"""A bundle's license when its training record names none (`training["license"]`; fits on the MWE data
record `cc-by-4.0`, the data's licence, as the vectors are derived from it)."""


def card_data(bundle: SteeringBundle, repo_id: str | None = None) -> ModelCardData:
    """The card's metadata: `library_name`, `license`, `base_model` (a Hub id only), `pipeline_tag`, `tags`,
    `datasets`, and `model-index` results from the bundle's evaluation.

    Example:

    ```python
    >>> card_data(bundle).to_dict()["license"]
    'cc-by-4.0'
    ```
    """
    config = bundle.config
    tags = ["w2s-hf", "steering", "activation-steering", f"steering-{config.method}"]
    if config.predictor is not None:
        tags.append("where-to-steer")
    base = config.base_model.name_or_path
    named = config.training.get("datasets") or []
    if not isinstance(named, list) or not all(isinstance(name, str) for name in named):
        raise BundleError(f"training.datasets must be a list of dataset ids, got {named!r}; fix it in "
                          f"{CONFIG_NAME} (or on `bundle.config`) before saving.")
    datasets = [name for name in named if is_hub_id(name)]
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=config.training.get("license", DEFAULT_LICENSE),
        base_model=base if is_hub_id(base) else None,  # the Hub rejects a card whose base_model is a local path
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
        model_name=repo_id or f"w2s-hf-{config.training.get('behavior', 'steering')}",
        eval_results=_eval_results(bundle, datasets) or None,
    )


def _eval_results(bundle: SteeringBundle, datasets: list[str]) -> list[EvalResult]:
    """`model-index` entries: steerability and proportion steerable of each evaluated setting (test split)."""
    behavior = bundle.config.training.get("behavior", "custom")
    results = []
    for row in _evaluation_rows(bundle.config.evaluation):
        for metric, key in (("steerability", "steerability"), ("proportion steerable", "prop_steerable")):
            results.append(EvalResult(
                task_type="text-generation", task_name="activation steering",
                dataset_type=datasets[0] if datasets else "custom", dataset_name=behavior, dataset_split="test",
                metric_type=key, metric_name=f"{metric} ({row['setting']})", metric_value=float(row[key]),
            ))
    return results


def bundle_summary(bundle: SteeringBundle) -> str:
    """One phrase for the model card: what the bundle steers with, and where (routed per prompt, or at
    the layers it steers without a router).

    Args:
        bundle: the bundle the card describes.

    Returns:
        `str`: the phrase, without a final full stop.

    Example:

    ```python
    >>> bundle_summary(SteeringBundle(BundleConfig(base_model=info, fixed_layer=12), {"steering_vectors": vectors}))
    'per-layer steering vectors (CAA activation addition), applied at layer 12 for every prompt (no layer predictor)'
    ```
    """
    config = bundle.config
    method_config = config.method_config()
    what = method_config.summary() if hasattr(method_config, "summary") else steering_method(config.method).summary
    if config.predictor is not None:
        return f"{what} plus a *Where-to-Steer* layer predictor that picks, for every prompt, the decoder layer to steer"
    layers = bundle.default_layers()
    if not layers:
        return f"{what}, with no layer predictor and no fixed layer (pass `steering_layer=` to `generate`)"
    named = f"{'layer' if len(layers) == 1 else 'layers'} {', '.join(map(str, layers))}"
    return f"{what}, applied at {named} for every prompt (no layer predictor)"


def _evaluation_rows(evaluation: dict) -> list[dict]:
    """The bundle's evaluation rows, each with a `setting` and the numbers `steerability` and `prop_steerable`;
    anything else is a `BundleError` naming the row."""
    rows = evaluation.get("rows") or []
    if not isinstance(rows, list):
        raise BundleError(f"evaluation.rows must be a list of rows, got {rows!r}; fix it in {CONFIG_NAME} "
                          "(or on `bundle.config`) before saving.")
    numbers = ("steerability", "prop_steerable")
    for index, row in enumerate(rows):
        if not (isinstance(row, dict) and "setting" in row
                and all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool) for key in numbers)):
            raise BundleError(f"evaluation.rows[{index}] is {row!r}: each row needs a 'setting' and the numbers "
                              f"'steerability' and 'prop_steerable'; fix it in {CONFIG_NAME} (or on `bundle.config`) "
                              "before saving.")
    return rows


def _evaluation_table(evaluation: dict) -> str:
    rows = _evaluation_rows(evaluation)
    if not rows:
        return "No evaluation was recorded in this bundle."
    header = "| setting | layer | steerability | prop. steerable |\n| --- | --- | ---: | ---: |"
    lines = [f"| {row['setting']} | {row.get('layer', 'routed')} | {row['steerability']:.3f} | "
             f"{row['prop_steerable']:.3f} |" for row in rows]
    note = evaluation.get("note", "")
    return "\n".join([header, *lines]) + (f"\n\n{note}" if note else "")


def _plots_section(plots: Sequence[str]) -> str:
    if not plots:
        return ""
    images = "\n\n".join(f"![{Path(name).stem.replace('_', ' ')}]({name})" for name in plots)
    return f"\n## Plots\n\n{images}\n"


def card_template() -> str:
    """The model card template: packaged as `w2s_hf.hub_cards` by `pip install`; in a source checkout run without
    installing (`python -m w2s_hf.cli` from the repository), read from the repository's top-level `hub_cards/`."""
    try:
        return (files("w2s_hf.hub_cards") / "model_card.md").read_text()
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[2] / "hub_cards" / "model_card.md").read_text()


def render_model_card(bundle: SteeringBundle, repo_id: str | None = None, plots: Sequence[str] = ()) -> str:
    """Renders the bundle's model card (YAML metadata + markdown).

    Args:
        bundle: the bundle the card describes.
        repo_id (*optional*): Hub id shown in the usage snippet.
        plots (*optional*): file names of PNG plots stored beside the card, embedded in a "Plots" section.

    Example:

    ```python
    >>> card = render_model_card(bundle, "me/my-bundle", plots=["steerability_per_layer.png"])
    >>> huggingface_hub.ModelCard(card).data.library_name
    'w2s-hf'
    ```
    """
    config = bundle.config
    template = card_template()
    candidates = bundle.tensors.get(f"{PREDICTOR_PREFIX}candidate_layers")
    base = config.base_model.name_or_path
    on_hub = is_hub_id(base)
    return template.format(
        metadata=card_data(bundle, repo_id).to_yaml().strip(),
        title=f"w2s-hf steering bundle for {base if on_hub else Path(base).name}",
        base_model=base,
        base_model_link=f"[`{base}`](https://huggingface.co/{base})" if on_hub else f"`{base}` (a local model)",
        summary=bundle_summary(bundle),
        repo_id=repo_id or "path/to/this/bundle",
        method=config.method,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        encoder=json.dumps(config.encoder.to_dict()) if config.encoder else "none (fixed layer)",
        candidates=candidates.tolist() if candidates is not None else "-",
        fixed_layer=config.fixed_layer,
        default_strength=config.default_strength,
        position_policy=config.position_policy,
        training=json.dumps(config.training) if config.training else "-",
        evaluation=_evaluation_table(config.evaluation),
        plots=_plots_section(plots),
    )


def write_model_card(bundle: SteeringBundle, directory: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Writes `README.md` (the model card) into a bundle folder, embedding the PNG plots found there.

    The card is rendered first and written through a temp file and a rename; a user's own `README.md` (not a
    w2s-hf card) is kept, with a warning (see :func:`write_card`).

    Raises:
        `BundleError`: the config holds something the card cannot show (nothing is written).
    """
    directory = Path(directory)
    with save_lock(directory):
        plots = sorted(path.name for path in directory.glob("*.png"))
        return write_card(directory, render_model_card(bundle, repo_id, plots))


def write_card(directory: Path, card: str) -> Path:
    """Writes a rendered card to `directory/README.md` atomically, unless a README there is not a w2s-hf card.

    The caller holds the folder's save lock. A symlink at `README.md` is replaced by the card, never written
    through: the file it points to (elsewhere, or a Hub cache blob) is left as it is.

    Returns:
        `Path`: the folder's `README.md`.
    """
    path = directory / CARD_NAME
    if (path.exists() or path.is_symlink()) and not is_w2s_card(path):
        logger.warning(
            "%s is not a w2s-hf model card (its metadata has no `library_name: %s`), so it was kept as it is and "
            "the bundle's card was not written; move it away and save again to get the card.", path, LIBRARY_NAME,
        )
        return path
    write_atomic(path, card.encode())
    return path


def is_w2s_card(path: Path) -> bool:
    """Whether `path` is a model card w2s-hf wrote: YAML metadata with `library_name: w2s-hf`."""
    import yaml

    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16).decode("utf-8", errors="replace")
    except OSError:
        return False
    parts = head.split("---", 2)
    if parts[0].strip() or len(parts) < 3:
        return False
    try:
        metadata = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return False
    return isinstance(metadata, dict) and metadata.get("library_name") == LIBRARY_NAME
