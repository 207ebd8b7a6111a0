"""The pair-comparison instruction of METHOD.md, per dataset, and the chat messages that carry it.

The instruction names an expert role, lists the dataset's attributes, shows the two images as
"item 1" and "item 2", and asks for JSON: item 1's attributes, item 2's attributes, differences,
confidence, reasoning, and the verdict key ("yes" | "no"). ``--prompt generic`` drops the role and
the attribute list (the ablation).
"""
from dataclasses import dataclass

BIRD_ATTRIBUTES = (
    "bill shape", "bill length", "bill color", "head pattern", "crown color", "forehead color", "eye color",
    "nape color", "throat color", "breast color", "breast pattern", "belly color", "belly pattern", "back color",
    "back pattern", "upperparts color", "wing color", "wing pattern", "wing shape", "tail shape", "tail pattern",
    "upper tail color", "under tail color", "underparts color", "shape", "size", "primary color", "leg color",
)
CAR_ATTRIBUTES = (
    "body style", "number of doors", "front grille", "headlights", "front bumper", "side profile", "roofline",
    "greenhouse", "wheels", "fenders and wheel arches", "rear lights", "rear bumper", "exhaust", "badging",
    "overall proportions", "apparent era", "paint finish",
)
AIRCRAFT_ATTRIBUTES = (
    "number of engines", "engine type", "engine mount position", "nacelle shape/size", "wing configuration",
    "wing planform", "winglets/wingtip shape", "tail configuration", "vertical stabilizer shape",
    "fuselage length/proportions", "nose shape", "cockpit window layout", "cabin window count/spacing",
    "landing gear layout", "overall size class", "apparent era", "livery and markings",
)
PROMPT_STYLES = ("dataset", "generic")  # the dataset's expert prompt; the generic one (ablation)
ITEM_KEYS = ("item 1", "item 2")


@dataclass(frozen=True)
class PromptSpec:
    """What the instruction asks: the expert, the category, the verdict key, the attributes."""

    role: str
    subject: str
    verdict_key: str
    attributes: tuple


DATASET_SPECS = {
    "cub": PromptSpec("an expert ornithologist", "bird species", "same_species", BIRD_ATTRIBUTES),
    "inat": PromptSpec("an expert ornithologist", "bird species", "same_species", BIRD_ATTRIBUTES),
    "inat_aves": PromptSpec("an expert ornithologist", "bird species", "same_species", BIRD_ATTRIBUTES),
    "cars": PromptSpec("an automotive expert", "car make, model and year", "same_model", CAR_ATTRIBUTES),
    "aircraft": PromptSpec("an aviation expert", "aircraft make, model and variant", "same_variant",
                           AIRCRAFT_ATTRIBUTES),
}


def prompt_spec(dataset_name: str, dataset=None) -> PromptSpec:
    """The spec for a dataset name; the synthetic (and folder) datasets use their own attribute list."""
    if dataset_name in DATASET_SPECS:
        return DATASET_SPECS[dataset_name]
    attributes = tuple(getattr(dataset, "attribute_names", None) or ())
    if dataset_name == "synthetic":
        return PromptSpec("an expert ornithologist", "bird species", "same_species", attributes)
    return PromptSpec("an expert", "class", "same_class", attributes)


def instruction(spec: PromptSpec, style: str = "dataset") -> str:
    """The instruction text that follows the two images (``style``: "dataset" | "generic")."""
    if style == "generic":
        return (f"Are item 1 and item 2 the same {spec.subject}? Answer in JSON with the keys "
                f'"differences" and "{spec.verdict_key}" ("yes" or "no").')
    if style != "dataset":
        raise ValueError(f"prompt style {style!r} is not 'dataset' or 'generic'")
    listed = ", ".join(spec.attributes) if spec.attributes else "every visible attribute"
    return (f"You are {spec.role}. Compare item 1 and item 2: are they the same {spec.subject}? "
            f"Describe item 1 along these attributes: {listed}. Describe item 2 the same way. "
            f'Answer in JSON with the keys "item 1", "item 2", "differences", "confidence" (high, medium or low), '
            f'"reasoning" and "{spec.verdict_key}" ("yes" or "no").')


def pair_messages(spec: PromptSpec, style: str = "dataset") -> list:
    """Chat messages with two image slots, labelled "item 1" and "item 2", then the instruction."""
    return [{
        "role": "user",
        "content": [
            {"type": "text", "text": "item 1:"},
            {"type": "image"},
            {"type": "text", "text": "item 2:"},
            {"type": "image"},
            {"type": "text", "text": instruction(spec, style)},
        ],
    }]


def pair_prompt(processor, spec: PromptSpec, style: str = "dataset") -> str:
    """The prompt string built with the model's own chat template, ending with the assistant turn."""
    return processor.apply_chat_template(pair_messages(spec, style), tokenize=False, add_generation_prompt=True)
