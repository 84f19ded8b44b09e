"""Chat: a conversation rendered with a checkpoint's chat template, and the ``chat`` command.

A chat checkpoint's ``tokenizer_config.json`` carries a jinja ``chat_template`` and the text of its
``bos_token`` and ``eos_token``. ``ChatTemplate.render`` renders a conversation, a list of
``{"role": "system" | "user" | "assistant", "content": str}``, as HF transformers'
``apply_chat_template`` does: an immutable sandboxed jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` globals, the ``tojson`` filter and
loop controls, and the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``. The rendered text is encoded without adding special tokens: the template writes the
bos token itself, and the tokenizer holds the bos and eos texts as added tokens, so each maps to
its one id wherever it stands in the text.

``ChatSession`` keeps a conversation's history and renders all of it, with the generation prompt,
for every reply; ``chat_loop`` is the command's read-reply loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence, TextIO, Union

from .data.tokenizer import (RELEASED_BOS, RELEASED_CHAT_TEMPLATE, RELEASED_EOS, TOKENIZER_CONFIG_NAME,
                             chat_template_of, read_tokenizer_config, token_text)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .model import DeepseekForCausalLM

PathLike = Union[str, "os.PathLike[str]"]
Message = Mapping[str, str]

RELEASED = "released"  # --template released


def compile_chat_template(source: str, where: str = "the chat template"):
    """``source`` compiled in the jinja environment that HF chat templates are written for."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where} is not a valid jinja template: {e.message} (line {e.lineno})") from None


def _check_messages(messages: Sequence[Message]) -> list[dict]:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be an object with \"role\" and \"content\" strings, "
                             f"got {m!r}")
        out.append(dict(m))
    return out


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template and its bos / eos token texts (None: not given, see ``bind``)."""

    source: str
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    where: str = "the chat template"

    def __post_init__(self):
        object.__setattr__(self, "_compiled", compile_chat_template(self.source, self.where))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text; ``add_generation_prompt`` ends it with the assistant's turn
        opening (``Assistant:`` in the released template)."""
        import jinja2

        try:
            return self._compiled.render(  # type: ignore[attr-defined]
                messages=_check_messages(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.where} failed: {e}") from None

    def bind(self, tokenizer: "Tokenizer") -> "ChatTemplate":
        """This template with its bos / eos texts checked against ``tokenizer``: each must encode
        to exactly one token (an added token), or the model would see it as ordinary text. Texts
        not given become the released ones where the tokenizer has them; else no bos, and the
        tokenizer's end-of-text token as eos."""
        from .data.tokenizer import TokenizerError, eos_id

        def one_token(text: str) -> bool:
            return len(tokenizer.encode(text, add_special_tokens=False).ids) == 1

        tokens = {}
        for name, given, released in (("bos_token", self.bos_token, RELEASED_BOS),
                                      ("eos_token", self.eos_token, RELEASED_EOS)):
            if given:
                if not one_token(given):
                    raise ValueError(f"the tokenizer has no token {given!r} ({name} of {self.where}): "
                                     "is this the checkpoint's tokenizer?")
            elif given is None and one_token(released):
                given = released
            elif given is None and name == "eos_token":
                try:
                    given = tokenizer.id_to_token(eos_id(tokenizer))
                except TokenizerError:
                    given = ""
            tokens[name] = given or ""
        return dataclasses.replace(self, **tokens)

    def eos_id(self, tokenizer: "Tokenizer") -> Optional[int]:
        """The id of the eos token (the end of a reply), None without one."""
        return tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, tokenizer: "Tokenizer", messages: Sequence[Message],
               add_generation_prompt: bool = True) -> list[int]:
        """The token ids of the rendered conversation: no special tokens are added, so the
        template's own bos token is the only one."""
        from .data.tokenizer import encode_checked

        return encode_checked(tokenizer, self.render(messages, add_generation_prompt), "conversation")


def load_chat_template(checkpoint: PathLike, template: Optional[PathLike] = None,
                       tokenizer: Optional[PathLike] = None) -> ChatTemplate:
    """The chat template of a checkpoint directory, from its ``tokenizer_config.json`` (or the
    one beside ``tokenizer``, a tokenizer.json or its folder, when given), with that file's
    bos / eos token texts.

    template: a jinja file to use instead, or ``"released"`` for ``RELEASED_CHAT_TEMPLATE``.
    A ValueError when there is no template: chat needs a chat model's.
    """
    folder = Path(checkpoint)
    if tokenizer is not None:
        t = Path(tokenizer)
        t = t if t.is_dir() else t.parent
        if (t / TOKENIZER_CONFIG_NAME).is_file():
            folder = t
    config = read_tokenizer_config(folder)
    config_path = folder / TOKENIZER_CONFIG_NAME
    where = f"the chat template of {config_path}"
    if template is not None and str(template) == RELEASED:
        source, where = RELEASED_CHAT_TEMPLATE, "the released chat template"
    elif template is not None:
        p = Path(template)
        if not p.is_file():
            raise ValueError(f"template file {p} does not exist")
        try:
            source = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"template file {p} is not readable text: {e}") from None
        where = f"the chat template {p}"
    else:
        source = chat_template_of(config)
        if not source:
            where = config_path if config_path.is_file() else folder
            raise ValueError(f"{where} has no chat_template in {TOKENIZER_CONFIG_NAME}: chat needs "
                             f"a chat model (or --template FILE)")
    return ChatTemplate(source,
                        bos_token=token_text(config.get("bos_token"), f"bos_token of {config_path}"),
                        eos_token=token_text(config.get("eos_token"), f"eos_token of {config_path}"),
                        where=where)


class ChatSession:
    """A conversation with a model: the history (an optional system message, then user and
    assistant turns), rendered whole with the generation prompt for every reply.

    ``sampling``: the keyword arguments of ``generate`` (temperature, greedy, top_k, top_p, seed).
    A reply ends at the template's eos token (or the model's and tokenizer's end-of-text) or after
    ``max_new_tokens``, and joins the history without its eos.
    """

    def __init__(self, model: "DeepseekForCausalLM", tokenizer: "Tokenizer", template: ChatTemplate,
                 max_new_tokens: int = 256, system: Optional[str] = None, **sampling: object):
        from .generate import check_prompt_text, check_sampling, default_stop_tokens

        check_sampling(max_new_tokens, **sampling)  # type: ignore[arg-type]
        self.model, self.tokenizer = model, tokenizer
        self.template = template.bind(tokenizer)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.system = check_prompt_text(system, "system message") if system else None
        self.messages: list[dict] = []
        eos = self.template.eos_id(tokenizer)
        self.stop_tokens = default_stop_tokens(tokenizer, model) | ({eos} if eos is not None else set())

    def history(self, messages: Optional[list[dict]] = None) -> list[dict]:
        """The conversation so far (or ``messages``), the system message first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.messages if messages is None else messages)

    def prompt_text(self) -> str:
        """The text the next reply continues: the history with the generation prompt."""
        return self.template.render(self.history(), add_generation_prompt=True)

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.messages.clear()

    def add_user(self, text: str) -> int:
        """Add a user message; return how many of the oldest turns were dropped so that the
        prompt plus ``max_new_tokens`` fits in ``max_position_embeddings`` (the system message is
        kept). A ValueError, and the history is left as it was, when the message does not fit
        even alone."""
        from .generate import check_prompt_text

        message = {"role": "user", "content": check_prompt_text(text, "message")}
        room = self.model.config.max_position_embeddings - self.max_new_tokens

        def length(messages: list[dict]) -> int:
            return len(self.template.encode(self.tokenizer, self.history(messages)))

        if (n := length([message])) > room:
            raise ValueError(f"the message ({n} tokens with the template"
                             f"{' and the system message' if self.system else ''}) + max_new_tokens "
                             f"{self.max_new_tokens} exceeds max_position_embeddings "
                             f"{self.model.config.max_position_embeddings}: shorten it or lower "
                             "--max-new-tokens")
        self.messages.append(message)
        dropped = 0
        while length(self.messages) > room:
            del self.messages[0]  # the oldest user message, then its replies
            while self.messages[0]["role"] != "user":
                del self.messages[0]
            dropped += 1
        return dropped

    def reply(self, stream: Optional[Callable[[str], None]] = None) -> str:
        """Generate the assistant's reply to the history, calling ``stream(text)`` with each new
        piece; the reply joins the history. Interrupted (KeyboardInterrupt), the reply so far
        joins the history, then the interrupt goes on."""
        from .generate import generate_text

        pieces: list[str] = []

        def on_text(row: int, piece: str) -> None:
            pieces.append(piece)
            if stream is not None:
                stream(piece)

        try:
            generate_text(self.model, self.tokenizer, self.prompt_text(), self.max_new_tokens,
                          stop_tokens=self.stop_tokens, stream=on_text, **self.sampling)
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        return "".join(pieces)


COMMANDS = {
    "/help": "this list",
    "/reset": "forget the conversation (the system message stays)",
    "/exit": "quit (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a reply stops the reply)",
}


def chat_loop(session: ChatSession, prompt: str = ">>> ", out: Optional[TextIO] = None,
              err: Optional[TextIO] = None) -> int:
    """Read user lines with ``input(prompt)`` and stream each reply to ``out`` until ``/exit``,
    end of input or Ctrl-C at the prompt; notes and errors go to ``err``. Ctrl-C during a reply
    stops it (what was said so far stays in the history) and returns to the prompt."""
    out = out or sys.stdout
    err = err or sys.stderr

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    positions = session.model.config.max_position_embeddings
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            if prompt:
                write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0]
            if command == "/exit":
                return 0
            if command == "/reset":
                session.reset()
                print("(the conversation is cleared)", file=err)
            elif command == "/help":
                write("".join(f"{c:<8} {what}\n" for c, what in COMMANDS.items()))
            else:
                print(f"unknown command {command}: /help lists them", file=err)
            continue
        try:
            dropped = session.add_user(line)
        except ValueError as e:
            print(f"error: {e}", file=err)
            continue
        if dropped:
            print(f"(dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}: the conversation "
                  f"and --max-new-tokens {session.max_new_tokens} no longer fit in "
                  f"max_position_embeddings {positions})", file=err)
        try:
            session.reply(stream=write)
        except KeyboardInterrupt:
            write("\n")
            print("(reply stopped; what it said so far stays in the conversation)", file=err)
            continue
        write("\n")
