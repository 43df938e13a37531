// tests/test_serve_openai.mjs: `ferry serve` through the official OpenAI Node SDK (npm
// `openai`), driven by tests/test_serve_openai.py, which starts the servers, computes the
// `ferry run` baselines and passes everything as JSON on stdin:
//   {"servers": [{"name", "url" (ending in /v1), "model", "key", "keyed" (the server checks
//     the key), "completions": [{prompt, max_tokens, text, finish, prompt_tokens,
//     completion_tokens}], "chats": [{user, max_tokens, text, finish, prompt_tokens}],
//     "stops": [{prompt, max_tokens, stop, text}],
//     "chat_stops": [{user, max_tokens, stop, text}]}]}
// Usage: node tests/test_serve_openai.mjs NPM_PREFIX < cases.json
// Prints one line per check; exits 1 if any failed.
import { createRequire } from "node:module";
import path from "node:path";

const prefix = process.argv[2];
const require = createRequire(path.join(path.resolve(prefix), "package.json"));
const OpenAI = require("openai");

const input = JSON.parse(await new Promise((resolve) => {
    let s = "";
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (d) => (s += d));
    process.stdin.on("end", () => resolve(s));
}));

let nOk = 0;
const failures = [];
function check(cond, what, request, expected, got) {
    if (cond) {
        nOk++;
        console.log(`ok    ${what}`);
    } else {
        const f = `FAIL  ${what}\n      request:  ${show(request)}` +
            `\n      expected: ${show(expected)}\n      got:      ${show(got)}`;
        failures.push(f);
        console.log(f);
    }
}
function show(x) {
    const s = typeof x === "string" ? x : JSON.stringify(x);
    return s === undefined ? String(x) : s.length > 600 ? s.slice(0, 600) + "..." : s;
}
function errInfo(e) {
    return e instanceof OpenAI.APIError
        ? { class: e.constructor.name, status: e.status, type: e.type, param: e.param, code: e.code,
            message: e.message }
        : { class: e?.constructor?.name, message: String(e) };
}
// Runs fn; a thrown error becomes a failed check instead of ending the script.
async function attempt(what, request, fn) {
    try {
        await fn();
    } catch (e) {
        check(false, what, request, "no exception", errInfo(e));
    }
}

async function streamCompletion(client, params) {
    const stream = await client.completions.create({ ...params, stream: true });
    let text = "", finish = null, usage = null, n = 0;
    for await (const chunk of stream) {
        n++;
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices) {
            text += c.text ?? "";
            if (c.finish_reason) finish = c.finish_reason;
        }
    }
    return { text, finish, usage, n };
}

async function streamChat(client, params) {
    const stream = await client.chat.completions.create({ ...params, stream: true });
    let text = "", finish = null, usage = null, role = null, n = 0;
    for await (const chunk of stream) {
        n++;
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices) {
            if (c.delta?.role) role = c.delta.role;
            text += c.delta?.content ?? "";
            if (c.finish_reason) finish = c.finish_reason;
        }
    }
    return { text, finish, usage, role, n };
}

for (const srv of input.servers) {
    const client = new OpenAI({ baseURL: srv.url, apiKey: srv.key, maxRetries: 0,
                                timeout: 600000 });
    const tag = srv.name;
    const model = srv.model;

    await attempt(`${tag}: models.list`, "models.list()", async () => {
        const ids = [];
        for await (const m of client.models.list()) ids.push(m.id);
        check(ids.length === 1 && ids[0] === model, `${tag}: models.list() gives [${model}]`,
              "models.list()", [model], ids);
    });

    for (const c of srv.completions) {
        const params = { model, prompt: c.prompt, max_tokens: c.max_tokens, temperature: 0 };
        await attempt(`${tag}: completions.create`, params, async () => {
            const r = await client.completions.create(params);
            const got = { text: r.choices[0].text, finish: r.choices[0].finish_reason,
                          prompt_tokens: r.usage?.prompt_tokens, object: r.object };
            check(got.text === c.text && got.finish === c.finish &&
                  got.prompt_tokens === c.prompt_tokens && got.object === "text_completion",
                  `${tag}: completions.create ${JSON.stringify(c.prompt)}: ferry run's text`,
                  params, { text: c.text, finish: c.finish, prompt_tokens: c.prompt_tokens }, got);
        });
        await attempt(`${tag}: completions.create stream`, params, async () => {
            const s = await streamCompletion(client, {
                ...params, stream_options: { include_usage: true } });
            check(s.text === c.text && s.finish === c.finish && s.usage?.prompt_tokens ===
                  c.prompt_tokens && s.usage?.completion_tokens >= c.completion_tokens - 1,
                  `${tag}: completions.create stream: true (${s.n} chunks, include_usage): the ` +
                  "same text, finish and usage",
                  { ...params, stream: true, stream_options: { include_usage: true } },
                  { text: c.text, finish: c.finish, prompt_tokens: c.prompt_tokens },
                  { text: s.text, finish: s.finish, usage: s.usage });
        });
    }

    for (const c of srv.chats) {
        const params = { model, messages: [{ role: "user", content: c.user }],
                         max_tokens: c.max_tokens, temperature: 0 };
        await attempt(`${tag}: chat.completions.create`, params, async () => {
            const r = await client.chat.completions.create(params);
            const m = r.choices[0].message;
            const got = { text: m.content, role: m.role, finish: r.choices[0].finish_reason,
                          prompt_tokens: r.usage?.prompt_tokens, object: r.object };
            check(got.text === c.text && got.role === "assistant" && got.finish === c.finish &&
                  got.prompt_tokens === c.prompt_tokens && got.object === "chat.completion",
                  `${tag}: chat.completions.create ${JSON.stringify(c.user)}: ferry run --chat's`,
                  params, { text: c.text, finish: c.finish, prompt_tokens: c.prompt_tokens }, got);
        });
        await attempt(`${tag}: chat.completions.create stream`, params, async () => {
            const s = await streamChat(client, params);
            check(s.text === c.text && s.finish === c.finish && s.role === "assistant",
                  `${tag}: chat.completions.create stream: true (${s.n} chunks): the same text`,
                  { ...params, stream: true }, { text: c.text, finish: c.finish },
                  { text: s.text, finish: s.finish, role: s.role });
        });
        await attempt(`${tag}: chat.completions.stream helper`, params, async () => {
            const runner = client.chat.completions.stream({ ...params, max_completion_tokens:
                c.max_tokens, max_tokens: undefined });
            const final = await runner.finalChatCompletion();
            check(final.choices[0].message.content === c.text &&
                  final.choices[0].finish_reason === c.finish,
                  `${tag}: chat.completions.stream(...).finalChatCompletion() with ` +
                  "max_completion_tokens: the same text", params, c.text,
                  { text: final.choices[0].message.content,
                    finish: final.choices[0].finish_reason });
        });
    }

    for (const c of srv.stops) {
        const params = { model, prompt: c.prompt, max_tokens: c.max_tokens, temperature: 0,
                         stop: c.stop };
        await attempt(`${tag}: stop`, params, async () => {
            const r = await client.completions.create(params);
            const s = await streamCompletion(client, params);
            check(r.choices[0].text === c.text && r.choices[0].finish_reason === "stop" &&
                  s.text === c.text && s.finish === "stop",
                  `${tag}: completions with stop ${JSON.stringify(c.stop)}: cut, plain and ` +
                  "streamed",
                  params, { text: c.text, finish: "stop" },
                  { plain: r.choices[0].text, finish: r.choices[0].finish_reason,
                    stream: s.text, stream_finish: s.finish });
        });
    }
    for (const c of srv.chat_stops) {
        const params = { model, messages: [{ role: "user", content: c.user }],
                         max_tokens: c.max_tokens, temperature: 0, stop: c.stop };
        await attempt(`${tag}: chat stop`, params, async () => {
            const r = await client.chat.completions.create(params);
            const s = await streamChat(client, params);
            check(r.choices[0].message.content === c.text && r.choices[0].finish_reason ===
                  "stop" && s.text === c.text && s.finish === "stop",
                  `${tag}: chat with stop ${JSON.stringify(c.stop)}: cut, plain and streamed`,
                  params, { text: c.text, finish: "stop" },
                  { plain: r.choices[0].message.content, stream: s.text, finish: s.finish });
        });
    }

    // errors become the SDK's typed exceptions
    const errCases = [
        ["n: 2", () => client.completions.create({ model, prompt: "x", max_tokens: 2, n: 2 }),
         OpenAI.BadRequestError, 400, "n", null],
        ["chat n: 2", () => client.chat.completions.create({
            model, messages: [{ role: "user", content: "x" }], max_tokens: 2, n: 2 }),
         OpenAI.BadRequestError, 400, "n", null],
        ["presence_penalty 1", () => client.chat.completions.create({
            model, messages: [{ role: "user", content: "x" }], max_tokens: 2,
            presence_penalty: 1 }),
         OpenAI.BadRequestError, 400, "presence_penalty", null],
        ["an unknown model", () => client.completions.create({ model: "no-such-model", prompt: "x",
                                                               max_tokens: 2 }),
         OpenAI.NotFoundError, 404, null, "model_not_found"],
        ["max_tokens past the context", () => client.completions.create({
            model, prompt: "x", max_tokens: 10000000 }),
         OpenAI.BadRequestError, 400, null, "context_length_exceeded"],
    ];
    if (srv.keyed) {
        const bad = new OpenAI({ baseURL: srv.url, apiKey: "wrong-key", maxRetries: 0 });
        errCases.push(["a wrong API key", () => bad.models.list(), OpenAI.AuthenticationError, 401,
                       null, null]);
    }
    for (const [what, fn, cls, status, param, code] of errCases) {
        let got = "no exception";
        try {
            await fn();
        } catch (e) {
            got = errInfo(e);
            check(e instanceof cls && e.status === status &&
                  (param === null || e.param === param) &&
                  (code === null || e.code === code) && typeof e.message === "string",
                  `${tag}: ${what} throws ${cls.name} (status ${status}` +
                  `${param ? ", param " + param : ""}${code ? ", code " + code : ""})`, what,
                  { class: cls.name, status, param, code }, got);
            continue;
        }
        check(false, `${tag}: ${what} throws ${cls.name}`, what, cls.name, got);
    }

    // a client that aborts mid-stream; the server goes on answering
    const c0 = srv.completions[0];
    await attempt(`${tag}: abort`, "abort", async () => {
        const stream = await client.completions.create({ model, prompt: c0.prompt,
            max_tokens: 2000, temperature: 0, stream: true, ignore_eos: true });
        let n = 0;
        for await (const _ of stream) {
            if (++n >= 2) {
                stream.controller.abort();
                break;
            }
        }
        const r = await client.completions.create({ model, prompt: c0.prompt,
                                                    max_tokens: c0.max_tokens, temperature: 0 });
        check(n === 2 && r.choices[0].text === c0.text,
              `${tag}: a stream aborted after 2 chunks; the next request gets ferry run's text`,
              "stream.controller.abort()", c0.text, { chunks: n, text: r.choices[0].text });
    });
}

console.log(`test_serve_openai.mjs: ${nOk} checks passed, ${failures.length} failed`);
process.exit(failures.length ? 1 : 0);
