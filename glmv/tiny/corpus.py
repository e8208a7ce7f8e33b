"""A deterministic training corpus for the locally trained byte-level BPE tokenizer.

No data can be downloaded, so the corpus is generated from a seed: English sentences, Chinese
phrases, numbers, JSON, code and the kind of text GLM-V prompts contain (questions about images,
boxes, tool calls). Byte-level BPE covers every input whatever the corpus; the corpus only
decides which merges exist, so tokens look natural in tests and demos.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_EN = (
    "the a an of to and in is it that for on with as was at by be this are from or have not "
    "image picture photo video frame scene person people cat dog car street sign tree sky water "
    "red blue green yellow black white left right top bottom center corner box bounding answer "
    "question think reason step first second then finally because therefore so what where which "
    "who how many describe compare count locate find show tell me please help look see shows "
    "there here one two three four five six seven eight nine ten small large big little old new "
    "document page table chart figure text title line number value total price date time day "
    "weather city temperature tool call function result search click open close screen button "
    "window app mobile phone computer keyboard mouse model vision language assistant user system "
    "hello world good great thanks sure yes no maybe answer is are were will would could should"
).split()
_ZH = (
    "你好 世界 图片 图像 视频 这是 什么 一个 我们 他们 请 描述 这张 中的 "
    "内容 位置 左边 右边 上面 下面 红色 蓝色 绿色 天气 北京 上海 城市 温度 "
    "今天 明天 时间 问题 答案 思考 因为 所以 首先 然后 最后 文档 表格 图表 "
    "数字 人 猫 狗 车 树 天空 水 街道 标志 房子 手机 电脑 屏幕 按钮 点击 打开 搜索"
).split()
_SNIPPETS = (
    "def main():\n    return 0\n",
    "for i in range(10):\n    print(i)\n",
    'import json\ndata = json.loads(text)\n',
    "if (x > 0) { return x; } else { return -x; }\n",
    '{"type": "function", "function": {"name": "get_weather", "parameters": {}}}',
    '{"city": "Beijing", "days": 2, "unit": "celsius"}',
    "[[123, 45, 678, 901]]",
    "[x1, y1, x2, y2]",
    "Let me think step by step.\n",
    "The answer is 42.\n",
    "Memory: none\nReason: the button is visible\nAction: click\n",
    "😀 🚗 🐱 ✅ ★ → ©",
)


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.55:
        words = [rng.choice(_EN) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice([".", "?", "!", ",", ":"])
    if kind < 0.8:
        return "".join(rng.choice(_ZH) for _ in range(rng.randint(2, 9))) + rng.choice("。？！，")
    if kind < 0.9:
        return " ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(5))
    return rng.choice(_SNIPPETS)


def corpus(seed: int, num_lines: int) -> Iterator[str]:
    """Yield `num_lines` lines of mixed text; the same seed always yields the same lines."""
    rng = random.Random(seed)
    for _ in range(num_lines):
        yield " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) + "\n"
