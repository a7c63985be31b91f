"""A PNG scatter plot of latency against time, with no plotting library: pixels, a 3x5 font, zlib."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (210, 210, 210)
BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)
FONT = {  # 3 wide, 5 tall
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", " ": "000000000000000",
    "e": "000111111100111", "t": "010111010010011", "f": "011010111010010", "m": "000111111101101",
    "s": "000011110001110", "r": "000101110100100", "o": "000111101101111", "x": "000101010101000",
}


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                self.set(x, y, color)

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 2) -> None:
        for k, char in enumerate(text):
            glyph = FONT.get(char, FONT[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    gx, gy = x + k * 4 * scale + (bit % 3) * scale, y + (bit // 3) * scale
                    self.rect(gx, gy, gx + scale - 1, gy + scale - 1, color)

    def png(self) -> bytes:
        rows = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width:3 * (y + 1) * self.width])
                        for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + \
            chunk(b"IEND", b"")


def _label(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def latency_plot(path: str | Path, series: dict[str, list[tuple[float, float]]], width: int = 800,
                 height: int = 480) -> Path:
    """Points (seconds since start, latency in seconds) per series name ("e2e", "ttft", "error"), drawn
    in ms against s, with a legend; the y axis starts at 0."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 40, height - 40
    points = [p for values in series.values() for p in values]
    x_max = max((x for x, _ in points), default=1.0) or 1.0
    y_max = max((y for _, y in points), default=1.0) * 1000 * 1.05 or 1.0
    for k in range(5):
        y = bottom - (bottom - top) * k // 4
        canvas.rect(left, y, right, y, GREY)
        canvas.text(8, y - 5, _label(y_max * k / 4))
        x = left + (right - left) * k // 4
        canvas.text(x - 8, bottom + 10, _label(x_max * k / 4))
    canvas.rect(left, top, left, bottom, BLACK)
    canvas.rect(left, bottom, right, bottom, BLACK)
    canvas.text(8, top - 30, "ms")
    canvas.text(right - 8, bottom + 24, "s")
    colors = {"e2e": BLUE, "ttft": ORANGE, "error": RED}
    for n, (name, values) in enumerate(series.items()):
        color = colors.get(name, BLACK)
        canvas.rect(left + 20 + n * 110, 12, left + 30 + n * 110, 22, color)
        canvas.text(left + 36 + n * 110, 12, name)
        for x, y in values:
            px = left + int((right - left) * x / x_max)
            py = bottom - int((bottom - top) * y * 1000 / y_max)
            canvas.rect(px - 2, py - 2, px + 2, py + 2, color)
    path = Path(path)
    path.write_bytes(canvas.png())
    return path
