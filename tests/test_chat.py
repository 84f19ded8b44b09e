"""Chat: the released chat template's rendering, encoding with one bos, the session's history,
and the `chat` and `generate --chat` commands on a tiny random model."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import pytest
import torch

from deepseek_moe.chat import (
    RELEASED_BOS as BOS,
    RELEASED_CHAT_TEMPLATE,
    RELEASED_EOS as EOS,
    ChatSession,
    ChatTemplate,
    chat_loop,
    load_chat_template,
    token_text,
)
from deepseek_moe.cli import main
from deepseek_moe.generate import generate_text
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config
from test_generate import one_thread  # noqa: F401 (autouse: tiny matrices run on one thread)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER_1 = {"role": "user", "content": "Who are you?"}
REPLY_1 = {"role": "assistant", "content": "I am DeepSeek Chat, héllo 世界."}
USER_2 = {"role": "user", "content": "What can you do?"}
CONVERSATIONS = [  # (messages, add_generation_prompt, the released format written out by hand)
    ([USER_1], True, f"{BOS}User: Who are you?\n\nAssistant:"),
    ([USER_1], False, f"{BOS}User: Who are you?\n\n"),
    ([SYSTEM, USER_1, REPLY_1, USER_2], True,
     f"{BOS}You are a helpful assistant.\n\nUser: Who are you?\n\nAssistant: I am DeepSeek Chat, "
     f"héllo 世界.{EOS}User: What can you do?\n\nAssistant:"),
    ([SYSTEM, USER_1, REPLY_1, USER_2], False,
     f"{BOS}You are a helpful assistant.\n\nUser: Who are you?\n\nAssistant: I am DeepSeek Chat, "
     f"héllo 世界.{EOS}User: What can you do?\n\n"),
    ([USER_1, REPLY_1], False, f"{BOS}User: Who are you?\n\nAssistant: I am DeepSeek Chat, héllo 世界.{EOS}"),
    ([], True, f"{BOS}Assistant:"),
]
RELEASED = ChatTemplate(RELEASED_CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)
INDENTED_TEMPLATE = ("{% for m in messages %}\n"
                     "    {% if m['role'] not in ['user', 'assistant'] %}\n"
                     "        {{ raise_exception('roles must be user or assistant') }}\n"
                     "    {% endif %}\n"
                     "[{{ m['role'] }}] {{ m['content'] | tojson }}\n"
                     "{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE whose vocabulary holds the released bos / eos as special tokens."""
    from deepseek_moe.data.tokenizer import train_tokenizer

    text = ["User: hello\n\nAssistant: hi, how are you? ", "héllo wörld, 世界 the quick brown fox "] * 20
    tok = train_tokenizer(text, vocab_size=300)
    tok.add_special_tokens([BOS, EOS])
    return tok


def small_model(vocab_size: int, **kw) -> DeepseekForCausalLM:
    torch.manual_seed(0)
    m = DeepseekForCausalLM(get_config("tiny", vocab_size=vocab_size, num_hidden_layers=2,
                                       first_k_dense_replace=1, **kw))
    m.init_weights(std=0.1)  # logits far enough apart for a stable argmax
    return m.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return small_model(tokenizer.get_vocab_size())


def write_checkpoint(path, model, tokenizer, tokenizer_config=None):
    from deepseek_moe.checkpoint import save_pretrained
    from deepseek_moe.data.tokenizer import save_tokenizer

    files = path.parent / f"{path.name}-files"
    files.mkdir()
    save_tokenizer(tokenizer, files / "tokenizer.json")
    extra = {"tokenizer.json": files / "tokenizer.json"}
    if tokenizer_config is not None:
        (files / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        extra["tokenizer_config.json"] = files / "tokenizer_config.json"
    save_pretrained(model, path, extra_files=extra)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tokenizer):
    """A chat checkpoint: the released template, bos / eos as the released config writes them."""
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False,  # noqa: E731
                       "normalized": True, "rstrip": False, "single_word": False}
    return write_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", model, tokenizer,
                            {"bos_token": added(BOS), "eos_token": added(EOS),
                             "chat_template": RELEASED_CHAT_TEMPLATE})


def greedy_reply(model, tokenizer, prompt_text: str, n: int) -> str:
    return generate_text(model, tokenizer, prompt_text, n, greedy=True,
                         stop_tokens={tokenizer.token_to_id(EOS)})


@pytest.mark.parametrize("messages, add_generation_prompt, want", CONVERSATIONS)
def test_released_template_renders_the_released_format(messages, add_generation_prompt, want):
    assert RELEASED.render(messages, add_generation_prompt) == want
    # A copy of the template whose '\n' escapes are real newlines renders the same.
    literal = ChatTemplate(RELEASED_CHAT_TEMPLATE.replace("\\n", "\n"), bos_token=BOS, eos_token=EOS)
    assert literal.render(messages, add_generation_prompt) == want


def test_rendering_equals_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)
    hf.chat_template = RELEASED_CHAT_TEMPLATE
    for messages, add_generation_prompt, want in CONVERSATIONS:
        if not messages:  # transformers refuses an empty conversation
            continue
        got = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert got == want == RELEASED.render(messages, add_generation_prompt)
    assert (hf.apply_chat_template([USER_1, REPLY_1], chat_template=INDENTED_TEMPLATE, tokenize=False)
            == ChatTemplate(INDENTED_TEMPLATE).render([USER_1, REPLY_1]))
    messages = [SYSTEM, USER_1, REPLY_1, USER_2]
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    assert list(ids) == RELEASED.bind(tokenizer).encode(tokenizer, messages)


def test_jinja_environment():
    """trim_blocks and lstrip_blocks, raise_exception, tojson: what HF chat templates rely on."""
    t = ChatTemplate(INDENTED_TEMPLATE)
    assert t.render([USER_1, REPLY_1]) == ('[user] "Who are you?"\n'
                                           '[assistant] "I am DeepSeek Chat, héllo 世界."\n')
    with pytest.raises(ValueError, match="roles must be user or assistant"):
        t.render([SYSTEM])
    with pytest.raises(ValueError, match="not a valid jinja template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="message 0 must be an object"):
        RELEASED.render([{"role": "user"}])
    with pytest.raises(ValueError, match="(?i)access to attribute"):  # the sandbox
        ChatTemplate("{{ messages.__class__.__subclasses__() }}").render([])


def test_encoding_has_exactly_one_bos(tokenizer):
    t = RELEASED.bind(tokenizer)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    ids = t.encode(tokenizer, [SYSTEM, USER_1, REPLY_1, USER_2])
    assert ids[0] == bos and ids.count(bos) == 1 and ids.count(eos) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == CONVERSATIONS[2][2]
    # A template that never writes the bos token: no bos at all (none is added).
    plain = ChatTemplate("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", bos_token=BOS, eos_token=EOS)
    assert plain.render([USER_1, USER_2]) == "Who are you?\nWhat can you do?\n"
    assert bos not in plain.bind(tokenizer).encode(tokenizer, [USER_1, USER_2])


def test_bind_checks_the_special_tokens(tokenizer):
    from deepseek_moe.data.tokenizer import EOS_TOKEN, train_tokenizer

    with pytest.raises(ValueError, match="the tokenizer has no token '<s>'"):
        ChatTemplate(RELEASED_CHAT_TEMPLATE, bos_token="<s>", eos_token=EOS).bind(tokenizer)
    # Not given: the released tokens where the tokenizer has them ...
    t = ChatTemplate(RELEASED_CHAT_TEMPLATE).bind(tokenizer)
    assert (t.bos_token, t.eos_token) == (BOS, EOS)
    # ... else no bos and the tokenizer's end-of-text token.
    plain_tok = train_tokenizer(["hello world "] * 10, vocab_size=270)
    t = ChatTemplate(RELEASED_CHAT_TEMPLATE).bind(plain_tok)
    assert (t.bos_token, t.eos_token) == ("", EOS_TOKEN)
    assert t.render([USER_1], True) == "User: Who are you?\n\nAssistant:"


def test_load_chat_template(tmp_path):
    assert token_text({"content": BOS, "lstrip": False}, "bos_token") == BOS
    assert token_text(EOS, "eos_token") == EOS and token_text(None, "x") is None
    with pytest.raises(ValueError, match="bos_token must be a string"):
        token_text(3, "bos_token")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for config in (None, {"bos_token": BOS}):  # no tokenizer_config.json; one without a template
        if config is not None:
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="has no chat_template in tokenizer_config.json: "
                                             "chat needs a chat model"):
            load_chat_template(folder)
    t = load_chat_template(folder, "released")
    assert t.source == RELEASED_CHAT_TEMPLATE and t.bos_token == BOS and t.eos_token is None
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert load_chat_template(folder, jinja).render([USER_1]) == "<user>Who are you?"
    with pytest.raises(ValueError, match="does not exist"):
        load_chat_template(folder, tmp_path / "missing.jinja")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"},
                           {"name": "default", "template": RELEASED_CHAT_TEMPLATE}],
         "bos_token": {"content": BOS}, "eos_token": EOS}))
    assert load_chat_template(folder).render([USER_1], True) == CONVERSATIONS[0][2]
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_chat_template(folder)


def test_session_history_reset_and_interrupt(model, tokenizer):
    s = ChatSession(model, tokenizer, ChatTemplate(RELEASED_CHAT_TEMPLATE), max_new_tokens=6,
                    system=SYSTEM["content"], greedy=True)
    assert s.add_user("hello") == 0
    assert s.prompt_text() == f"{BOS}You are a helpful assistant.\n\nUser: hello\n\nAssistant:"
    pieces: list[str] = []
    reply = s.reply(stream=pieces.append)
    asked = s.template.render(s.history()[:-1], add_generation_prompt=True)
    assert reply == "".join(pieces) == greedy_reply(model, tokenizer, asked, 6)
    assert s.history()[-1] == {"role": "assistant", "content": reply}
    s.add_user("and?")
    assert s.prompt_text().endswith(f"Assistant: {reply}{EOS}User: and?\n\nAssistant:")
    s.reset()
    s.add_user("hi")
    assert s.prompt_text() == f"{BOS}You are a helpful assistant.\n\nUser: hi\n\nAssistant:"

    def stop(piece: str) -> None:  # Ctrl-C after the first piece
        stop.seen = piece
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.reply(stream=stop)
    assert s.history()[-2:] == [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": stop.seen}]


def test_old_turns_are_dropped_when_the_history_no_longer_fits(tokenizer):
    m = small_model(tokenizer.get_vocab_size(), max_position_embeddings=128)
    s = ChatSession(m, tokenizer, ChatTemplate(RELEASED_CHAT_TEMPLATE), max_new_tokens=8, system="Be brief.")
    drops = []
    for i in range(6):
        drops.append(s.add_user(f"message number {i}, the quick brown fox"))
        assert len(s.template.encode(tokenizer, s.history())) + 8 <= 128
        s.messages.append({"role": "assistant", "content": f"reply {i}"})
    assert drops == [0, 0, 1, 1, 1, 1]  # two turns fit
    history = s.history()
    assert history[0] == {"role": "system", "content": "Be brief."}
    assert history[1]["role"] == "user" and history[-2]["content"] == "message number 5, the quick brown fox"
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 128"):
        s.add_user("the quick brown fox " * 40)
    assert s.history() == history  # a message too long by itself changes nothing


def test_chat_command(ckpt, model, tokenizer, monkeypatch, capsys):
    """`hello`, `/reset`, `hi`, `/exit` through stdin: two streamed replies, the second to a
    conversation of one user turn."""
    seen = []
    reply = ChatSession.reply

    def spy(self, stream=None):
        seen.append(self.prompt_text())
        return reply(self, stream)

    monkeypatch.setattr(ChatSession, "reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhi\n/help\n/nope\n/exit\nnever read\n"))
    assert main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert seen == [f"{BOS}User: hello\n\nAssistant:", f"{BOS}User: hi\n\nAssistant:"]
    out, err = capsys.readouterr()
    replies = [greedy_reply(model, tokenizer, p, 5) for p in seen]
    assert any(replies)
    assert out.startswith(f"{replies[0]}\n{replies[1]}\n/help ")
    assert ">>>" not in out  # no prompt when stdin is not a terminal
    assert "the conversation is cleared" in err and "unknown command /nope" in err


def test_chat_loop_ctrl_c(model, tokenizer, monkeypatch):
    s = ChatSession(model, tokenizer, ChatTemplate(RELEASED_CHAT_TEMPLATE), max_new_tokens=6, greedy=True)

    class CtrlCOnFirstText(io.StringIO):
        fired = False

        def write(self, text):
            super().write(text)
            if text.strip() and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
            return len(text)

    lines = iter(["hello"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt quits

    monkeypatch.setattr("builtins.input", read)
    out, err = CtrlCOnFirstText(), io.StringIO()
    assert chat_loop(s, prompt=">>> ", out=out, err=err) == 0
    assert out.fired and "reply stopped" in err.getvalue()
    assert s.messages[0]["content"] == "hello" and s.messages[1]["role"] == "assistant"
    assert s.messages[1]["content"] and out.getvalue().startswith(s.messages[1]["content"])


def test_generate_chat_prints_only_the_reply(ckpt, model, tokenizer, capsys):
    assert main(["generate", str(ckpt), "--prompt", "hello", "--chat", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    want = greedy_reply(model, tokenizer, f"{BOS}User: hello\n\nAssistant:", 5)
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", str(ckpt), "--prompt", "hello", "--template", "released"]) == 2
    assert "--template is for --chat" in capsys.readouterr().err


def test_a_model_without_a_chat_template_is_a_one_line_error(tmp_path, model, tokenizer, monkeypatch,
                                                               capsys):
    plain = write_checkpoint(tmp_path / "base", model, tokenizer, {"bos_token": BOS, "eos_token": EOS})
    for argv in (["chat", str(plain)], ["generate", str(plain), "--prompt", "x", "--chat"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "has no chat_template in tokenizer_config.json: chat needs a chat model" in err
    # --template supplies one.
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(plain), "--template", "released", "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    want = greedy_reply(model, tokenizer, f"{BOS}User: hello\n\nAssistant:", 3)
    assert capsys.readouterr().out == want + "\n"
