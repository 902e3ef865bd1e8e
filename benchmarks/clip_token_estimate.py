"""How far `lint`'s CLIP token estimate is from CLIP's real tokenizer, on captions of the kinds diffusion datasets hold.

    python benchmarks/clip_token_estimate.py                          # CLIP's vocabulary from an installed open_clip_torch
    python benchmarks/clip_token_estimate.py --clip_tokenizer sd15/tokenizer   # or a CLIP tokenizer folder
    python benchmarks/clip_token_estimate.py --bpe bpe_simple_vocab_16e6.txt.gz --per_style

Captions: four generated styles (booru tags with underscores, weighted SD prompt tags, short BLIP-like sentences,
long LLaVA-like descriptions; fixed seed) and English prose cut into caption-sized pieces from the installed
packages' own descriptions (technical text with rare words: a harder case than most captions). For each, the
estimate (text_encoders.estimate_clip_tokens) is compared with the exact count, start and end tokens included on
both sides: mean and largest error, and how many captions the two put on different sides of the 77-token limit.
"""

from __future__ import annotations

import argparse
import glob
import random
import re
import statistics
import sys
from pathlib import Path

from caption_train.text_encoders import CLIP_LIMIT, clip_counter, estimate_clip_tokens

BOORU = """1girl 1boy 2girls solo long_hair short_hair blonde_hair black_hair brown_hair silver_hair blue_eyes red_eyes
green_eyes looking_at_viewer smile open_mouth closed_mouth blush simple_background white_background outdoors indoors
sky cloud day night tree grass flower water beach ocean city street building window sitting standing lying
holding_weapon holding_sword school_uniform serafuku pleated_skirt thighhighs zettai_ryouiki hair_ornament hairband
ribbon hair_ribbon bow twintails ponytail braid ahoge bangs blunt_bangs sidelocks jewelry earrings necklace gloves
long_sleeves short_sleeves dress shirt white_shirt jacket hoodie hat witch_hat animal_ears cat_ears fox_ears tail
wings upper_body full_body cowboy_shot portrait from_side from_behind from_above dutch_angle depth_of_field
blurry_background bokeh light_particles sunlight lens_flare petals cherry_blossoms snow rain umbrella book cup
food cake scenery no_humans highres absurdres commentary_request translated watermark signature artist_name
hand_on_hip arms_up v peace_sign crossed_arms head_tilt wavy_hair messy_hair multicolored_hair streaked_hair
gradient_hair heterochromia fang tongue_out teeth parted_lips :d ;) >_< ^_^ 3: o_o""".split()
QUALITY = """masterpiece best_quality high_quality ultra-detailed 8k photorealistic cinematic_lighting volumetric_lighting
sharp_focus intricate_details trending_on_artstation octane_render unreal_engine hdr film_grain bokeh award-winning""".split()
SUBJECTS = """a woman|a man|a young girl|an old man|a dog|a cat|a golden retriever|a red car|a bicycle|a wooden table|
a bowl of fruit|a group of people|two children|a lighthouse|a mountain range|a small boat|a horse|a bird|a plate of food|
a city skyline|a living room|a kitchen|a woman in a red dress|a man wearing glasses|a street vendor|a train|an airplane""".replace("\n", "").split("|")
ACTIONS = """standing on|sitting on|walking along|lying on|running across|looking at|holding|leaning against|riding|
parked next to|floating above|reflected in|surrounded by|covered in|next to""".replace("\n", "").split("|")
PLACES = """a sandy beach|a busy street|a snowy field|a wooden bench|the grass|a kitchen counter|a table|a rocky shore|
a forest path|a city park|a white background|a cloudy sky|a calm lake|a crowded market|an empty road|a brick wall""".replace("\n", "").split("|")
DETAILS = """The lighting is soft and warm|The background is blurred|Shadows fall across the ground|The colors are muted
and pastel|There are several people in the distance|The sky is overcast|Sunlight streams through the window|The image
has a shallow depth of field|A few clouds drift overhead|The scene feels calm and quiet|Reflections shimmer on the
water|The photograph was taken at dusk|Leaves are scattered on the path|The composition is centered and symmetrical
""".replace("\n", " ").split("|")


def booru(rng: random.Random) -> str:
    return ", ".join(rng.sample(BOORU, rng.randint(8, 40)))


def sd_prompt(rng: random.Random) -> str:
    tags = rng.sample(QUALITY, rng.randint(2, 6)) + rng.sample(BOORU, rng.randint(5, 30))
    tags = [t.replace("_", " ") for t in tags]
    tags = [f"({t}:{rng.choice(['1.1', '1.2', '1.3', '0.8'])})" if rng.random() < 0.2 else t for t in tags]
    return ", ".join(tags)


def short_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"


def long_description(rng: random.Random) -> str:
    first = f"The image shows {short_sentence(rng)}."
    details = ". ".join(d.strip() for d in rng.sample(DETAILS, rng.randint(2, 8)))
    return f"{first} {details}."


def prose_pieces(limit: int, rng: random.Random) -> list[str]:
    """Prose sentences from installed packages' METADATA descriptions, cut to 5-80 words (real English, many
    technical words)."""
    site = Path(argparse.__file__).parent  # stdlib; the packages' METADATA is beside the running interpreter's
    files = sorted(glob.glob(str(Path(sys.prefix) / "lib" / "python*" / "site-packages" / "*.dist-info" / "METADATA")))
    sentences = []
    for name in files or sorted(glob.glob(str(site / "**" / "*.txt"), recursive=True))[:50]:
        text = Path(name).read_text(encoding="utf-8", errors="ignore").split("\n\n", 1)[-1]
        for line in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = line.split()
            if 5 <= len(words) and sum(ch.isalpha() or ch.isspace() for ch in line) > 0.9 * len(line):
                sentences.append(" ".join(words[:80]))
    rng.shuffle(sentences)
    return sentences[:limit]


def compare(captions: list[str], exact) -> dict:
    truth = exact(captions)
    estimates = [estimate_clip_tokens(c) for c in captions]
    errors = [e - t for e, t in zip(estimates, truth)]
    relative = [abs(e) / t for e, t in zip(errors, truth)]
    near = [(e, t) for e, t in zip(estimates, truth) if 60 <= t <= 95]
    return {
        "captions": len(captions), "median tokens": statistics.median(truth),
        "mean error": statistics.mean(errors), "mean |error|": statistics.mean(abs(e) for e in errors),
        "95% |error| <=": sorted(abs(e) for e in errors)[int(0.95 * (len(errors) - 1))],
        "max |error|": max(abs(e) for e in errors), "mean |error| %": 100 * statistics.mean(relative),
        "wrong side of 77": sum((e > CLIP_LIMIT) != (t > CLIP_LIMIT) for e, t in zip(estimates, truth)),
        "over 77 (exact)": sum(t > CLIP_LIMIT for t in truth),
        "missed (exact over, estimate not)": sum(t > CLIP_LIMIT >= e for e, t in zip(estimates, truth)),
        "60-95 tokens: mean |error|": statistics.mean(abs(e - t) for e, t in near) if near else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip_tokenizer", default=None, help="a CLIP tokenizer folder (vocab.json + merges.txt)")
    parser.add_argument("--bpe", default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: open_clip_torch's, if installed)")
    parser.add_argument("--per_caption", type=int, default=2000, help="captions per style")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counter = clip_counter(args.clip_tokenizer, bpe_path=args.bpe)
    if not counter.exact:
        sys.exit("no CLIP tokenizer: pass --clip_tokenizer or --bpe, or pip install open_clip_torch")
    print(f"exact counts: {counter.source}")
    rng = random.Random(args.seed)
    styles = {
        "booru tags": [booru(rng) for _ in range(args.per_caption)],
        "SD prompt tags": [sd_prompt(rng) for _ in range(args.per_caption)],
        "short sentences": [short_sentence(rng) for _ in range(args.per_caption)],
        "long descriptions": [long_description(rng) for _ in range(args.per_caption)],
        "package prose": prose_pieces(args.per_caption, rng),
    }
    for style, captions in styles.items():
        result = compare(captions, counter.count)
        print(f"{style:18s} " + "; ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
