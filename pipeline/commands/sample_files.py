"""Files made by code, for the quickstart, tests and benchmarks (nothing downloaded, nothing copied).

- :func:`make_quickstart_media`: two images (PNG, JPEG) and a 9-page PDF drawn with Pillow,
  so the quickstart shows images and PDF splitting next to the hand-written texts.
- :func:`make_text_corpus`: ``n`` small, distinct text files spread over folders.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_FIXED_DATE = time.gmtime(1_767_225_600)  # 2026-01-01, as Pillow's PDF writer takes dates
_TOPICS = ["rivers", "bridges", "orchards", "comets", "glaciers", "harbours", "libraries",
           "railways", "deserts", "lighthouses", "beehives", "windmills", "coral reefs",
           "observatories", "vineyards", "tunnels"]
_VERBS = ["shape", "connect", "feed", "cross", "carve", "shelter", "preserve", "cool", "guide"]
_WORDS = ["water", "stone", "light", "wind", "salt", "iron", "clay", "timber", "ice", "sand",
          "glass", "copper", "wool", "honey", "coal", "silk"]


def _page(text: str, size: tuple[int, int] = (620, 877)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=28)
    draw.multiline_text((48, 60), text, fill="black", font=font, spacing=10)
    return img


def make_quickstart_media(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    chart = Image.new("RGB", (480, 320), "white")
    draw = ImageDraw.Draw(chart)
    for i, height in enumerate([120, 200, 90, 260, 170]):
        draw.rectangle((40 + i * 85, 300 - height, 100 + i * 85, 300), fill=(40, 90 + i * 30, 200))
    draw.text((40, 20), "Monthly rainfall", fill="black", font=ImageFont.load_default(size=24))
    path = folder / "rainfall-chart.png"
    chart.save(path)
    made.append(path)

    sunset = Image.new("RGB", (640, 400))
    px = sunset.load()
    assert px is not None
    for y in range(400):
        for x in range(0, 640, 4):
            colour = (255, max(0, 200 - y // 2), max(0, 120 - y // 3))
            for dx in range(4):
                px[x + dx, y] = colour
    ImageDraw.Draw(sunset).ellipse((260, 220, 380, 340), fill=(255, 240, 120))
    path = folder / "sunset.jpg"
    sunset.save(path, quality=85)
    made.append(path)

    pages = [_page(f"Field guide to {topic}\n\nPage {n + 1} of 9\n\nNotes on how {topic}\n"
                   f"{_VERBS[n % len(_VERBS)]} the land.")
             for n, topic in enumerate(_TOPICS[:9])]
    path = folder / "field-guide.pdf"
    # Fixed dates: the same bytes on every call, so a second `samples` changes nothing.
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72,
                  creationDate=_FIXED_DATE, modDate=_FIXED_DATE)
    made.append(path)
    return made


def make_text_corpus(folder: Path, n: int, *, seed: int = 7, per_folder: int = 500,
                     words: int = 12) -> list[Path]:
    """``n`` distinct small text files (``words`` keywords each), ``per_folder`` to a folder."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        sub = folder / f"d{i // per_folder:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        topic = _TOPICS[i % len(_TOPICS)]
        keywords = " ".join(rng.choice(_WORDS) for _ in range(words))
        text = (f"Note {i}: {topic} {rng.choice(_VERBS)} the country around them. "
                f"Keywords: {keywords}.\n")
        path = sub / f"note-{i:07d}.txt"
        path.write_text(text, encoding="utf-8")
        made.append(path)
    return made
