#!/usr/bin/env python3
"""cudaemu/rewrite.py: turns a CUDA source into C++ for the emulated CUDA build.

    rewrite.py IN.cu OUT.cpp

Three mechanical rewrites, nothing else, so the CUDA sources stay ordinary CUDA:
  kernel<<<grid, block, shared, stream>>>(args)
      -> cudaemu_launch(cudaemu_config(grid, block, shared, stream), "kernel", kernel, args)
  extern __shared__ T name[];
      -> T *name = (T *)cudaemu_dynamic_shared();
  __shared__ T name[...];            (inside a function)
      -> the same, followed by CUDAEMU_SHARED_POISON(name); (NaN bytes for each new block)
Line breaks are kept, and a #line directive names the original file, so compiler messages
and __FILE__/__LINE__ point at the .cu source.
"""
import os
import re
import sys


def mask(src):
    """src with comments and string/char literals blanked (same length, newlines kept)."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def fail(src, pos, path, what):
    line = src.count("\n", 0, pos) + 1
    sys.exit(f"{path}:{line}: cudaemu/rewrite.py: {what}")


def matching(code, i, open_c, close_c, step):
    """Index of the bracket matching code[i] walking by step (+1 forward, -1 back)."""
    depth = 0
    while 0 <= i < len(code):
        if code[i] == open_c:
            depth += 1
        elif code[i] == close_c:
            depth -= 1
            if depth == 0:
                return i
        i += step
    return -1


def launches(src, code, path):
    edits = []
    for m in re.finditer(r"<<<", code):
        i = m.start()
        # the kernel: an identifier, perhaps with template arguments, before <<<
        k = i - 1
        while k >= 0 and code[k].isspace():
            k -= 1
        if code[k] == ">":
            k = matching(code, k, ">", "<", -1)
            if k < 0:
                fail(src, i, path, "unbalanced template arguments before <<<")
            k -= 1
            while k >= 0 and code[k].isspace():
                k -= 1
        end_name = k + 1
        while k >= 0 and (code[k].isalnum() or code[k] in "_:"):
            k -= 1
        start = k + 1
        if start == end_name:
            fail(src, i, path, "no kernel name before <<<")
        # the configuration, up to >>> outside parentheses
        j, depth = i + 3, 0
        while j < len(code):
            if code[j] in "([{":
                depth += 1
            elif code[j] in ")]}":
                depth -= 1
            elif depth == 0 and code.startswith(">>>", j):
                break
            j += 1
        else:
            fail(src, i, path, "<<< without >>>")
        a = j + 3
        while a < len(code) and code[a].isspace():
            a += 1
        if a >= len(code) or code[a] != "(":
            fail(src, i, path, "no argument list after >>>")
        close = matching(code, a, "(", ")", 1)
        if close < 0:
            fail(src, a, path, "unbalanced argument list")
        kernel = src[start:i].strip()
        name = " ".join(kernel.split())
        cfg = src[i + 3 : j]
        empty = src[a + 1 : close].strip() == ""
        text = (f'cudaemu_launch(cudaemu_config({" ".join(cfg.split())}), "{name}", '
                f'{" ".join(kernel.split())}{"" if empty else ", "}')
        text += "\n" * src.count("\n", start, a + 1)
        edits.append((start, a + 1, text))
    return edits


def declarators(decl):
    """A declaration's text split at the commas between its declarators (not those inside
    brackets, parentheses, braces or template arguments)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(decl):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(decl[start:i])
            start = i + 1
    parts.append(decl[start:])
    return parts


def shared(src, code, path):
    edits = []
    depth_at, depth = [], 0
    for c in code:
        depth_at.append(depth)
        depth += (c == "{") - (c == "}")
    for m in re.finditer(r"\b__shared__\b", code):
        semi = code.find(";", m.end())
        if semi < 0:
            fail(src, m.start(), path, "__shared__ declaration without ;")
        before = code.rfind("extern", max(0, m.start() - 40), m.start())
        if before >= 0 and code[before + 6 : m.start()].strip() == "":
            decl = re.fullmatch(r"\s*(?:__align__\s*\(\s*\d+\s*\)\s*)?(.+?)\s*\b(\w+)\s*\[\s*\]\s*",
                                code[m.end() : semi])
            if not decl:
                fail(src, m.start(), path, "extern __shared__ declaration not of the form "
                     "'extern __shared__ T name[];'")
            t, name = decl.group(1), decl.group(2)
            newlines = "\n" * src.count("\n", before, semi)
            edits.append((before, semi + 1,
                          f"{t} *{name} = ({t} *)cudaemu_dynamic_shared();{newlines}"))
            continue
        if depth_at[m.start()] == 0:
            continue  # namespace scope: the plain thread_local definition serves
        names = []
        for part in declarators(code[m.end() : semi]):
            decl = re.match(r"[^=\[]*?\b(\w+)\s*(?:\[|=|$)", part.strip())
            if not decl:
                fail(src, m.start(), path, "cannot find the names this __shared__ declares")
            names.append(decl.group(1))
        poison = "".join(f" CUDAEMU_SHARED_POISON({n});" for n in names)
        edits.append((semi + 1, semi + 1, poison))
    return edits


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: rewrite.py IN.cu OUT.cpp")
    path, out = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        src = f.read()
    code = mask(src)
    edits = sorted(launches(src, code, path) + shared(src, code, path))
    res, pos = [], 0
    for start, end, text in edits:
        if start < pos:
            fail(src, start, path, "overlapping rewrites")
        res.append(src[pos:start])
        res.append(text)
        pos = end
    res.append(src[pos:])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    path_lit = path.replace("\\", "\\\\").replace('"', '\\"')
    with open(out, "w", encoding="utf-8") as f:
        f.write(f'#line 1 "{path_lit}"\n' + "".join(res))


if __name__ == "__main__":
    main()
