"""Chat templates: a registry of named formats, YAML-defined ones, and the tokenizer's own.

A :class:`ChatTemplate` is data, not Jinja: a BOS string, per-role prefix / suffix, a separator
between messages, and which roles are trained. Rendering a conversation therefore yields the text
*and* the exact character spans of every trained part (an assistant turn's content and its
end-of-turn suffix), so masks never come from searching the text for the content (which breaks on
repeated content). :meth:`ChatTemplate.to_jinja` writes the same format as a Jinja template for
``tokenizer.chat_template``, so a saved model, ``evaluate`` and vLLM format prompts identically;
a round-trip test checks the two renderings agree for every registered template.

``{bos}`` and ``{eos}`` in any string stand for the tokenizer's BOS / EOS tokens; they are bound
with :meth:`ChatTemplate.bind`. The pseudo-role ``text`` (plain-text documents) renders as
``bos + content + eos`` and is trained on every token.

Config (``model.chat_template``): ``null`` or ``tokenizer`` (the tokenizer's own Jinja template;
masks then come from its full rendering, see ``tokenize.py``), a registry name, a Jinja string,
or a mapping with the fields of :class:`ChatTemplate` (a YAML-defined template).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from post_training.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
TEXT_ROLE = "text"
SYSTEM_MODES = ("role", "merge", "drop")


@dataclass(frozen=True)
class RoleFormat:
    """How one role renders: ``prefix + content + suffix``; ``train`` marks content + suffix.

    ``after`` is emitted (untrained) only when another message or the generation prompt
    follows, e.g. Tulu's newline after ``eos`` between turns."""

    prefix: str = ""
    suffix: str = ""
    train: bool = False
    after: str = ""


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data. See the module docstring.

    ``roles`` maps system / user / assistant to their :class:`RoleFormat`; a role absent from it
    is not rendered (``assistant_only``). ``system``: ``role`` renders system messages with their
    own format, ``merge`` prepends the system content plus ``system_separator`` to the next user
    message (formats without a system role, e.g. mistral), ``drop`` omits them.
    ``separator`` goes between two rendered messages (never trained), ``generation_prefix``
    (default: the assistant prefix) opens the reply at inference.
    """

    name: str
    roles: Mapping[str, RoleFormat]
    bos: str = ""
    separator: str = ""
    generation_prefix: str | None = None
    system: str = "role"
    system_separator: str = "\n\n"
    text_suffix: str = "{eos}"
    default_system: str | None = None
    stop_tokens: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ConfigError(
                f"chat template {self.name!r}: unknown roles {sorted(unknown)} (known: {ROLES})"
            )
        if self.system not in SYSTEM_MODES:
            raise ConfigError(
                f"chat template {self.name!r}: system must be one of {SYSTEM_MODES}, "
                f"got {self.system!r}"
            )
        if "assistant" not in self.roles:
            raise ConfigError(f"chat template {self.name!r}: needs an assistant role format")

    @property
    def gen_prefix(self) -> str:
        if self.generation_prefix is not None:
            return self.generation_prefix
        return self.roles["assistant"].prefix

    def bind(self, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        """Substitute ``{bos}`` / ``{eos}`` with the tokenizer's tokens."""

        def sub(text: str) -> str:
            if "{bos}" in text and not bos_token:
                raise ConfigError(f"chat template {self.name!r} uses {{bos}}: no BOS token")
            if "{eos}" in text and not eos_token:
                raise ConfigError(f"chat template {self.name!r} uses {{eos}}: no EOS token")
            return text.replace("{bos}", bos_token or "").replace("{eos}", eos_token or "")

        return replace(
            self,
            roles={
                r: RoleFormat(sub(f.prefix), sub(f.suffix), f.train, sub(f.after))
                for r, f in self.roles.items()
            },
            bos=sub(self.bos),
            separator=sub(self.separator),
            generation_prefix=None if self.generation_prefix is None else sub(self.gen_prefix),
            text_suffix=sub(self.text_suffix),
            stop_tokens=tuple(sub(t) for t in self.stop_tokens),
        )

    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character spans ``[start, end)`` that are trained."""
        parts: list[str] = [self.bos]
        length = len(self.bos)
        spans: list[tuple[int, int]] = []
        pending = ""  # separator owed before the next rendered message
        pending_system = ""
        if (
            self.default_system is not None
            and messages
            and messages[0]["role"] not in ("system", TEXT_ROLE)
        ):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system" and self.system != "role":
                if self.system == "merge":
                    pending_system += content + self.system_separator
                continue
            if role == TEXT_ROLE:
                fmt = RoleFormat("", self.text_suffix, train=True)
            else:
                fmt = self.roles.get(role)
                if fmt is None:
                    continue
            if role == "user" and pending_system:
                content, pending_system = pending_system + content, ""
            head = pending + fmt.prefix
            body = content + fmt.suffix
            parts += [head, body]
            length += len(head)
            if fmt.train:
                spans.append((length, length + len(body)))
            length += len(body)
            pending = self.separator + fmt.after
        if add_generation_prompt:
            parts += [pending, self.gen_prefix]
        return "".join(parts), spans

    def to_jinja(self) -> str:
        """The same format as a Jinja chat template (for ``tokenizer.chat_template``)."""

        def lit(text: str) -> str:
            return json.dumps(text)

        def emit(role: str, fmt: RoleFormat, content: str, extra: str = "") -> str:
            return (
                "{%- elif role == " + lit(role) + " -%}"
                "{{- ns.pending + "
                + lit(fmt.prefix)
                + " + "
                + content
                + " + "
                + lit(fmt.suffix)
                + " -}}"
                + extra
                + "{%- set ns.pending = "
                + lit(self.separator + fmt.after)
                + " -%}"
            )

        out = [
            "{%- set ns = namespace(pending='', sys='') -%}",
            "{{- " + lit(self.bos) + " -}}",
        ]
        if self.default_system is not None:
            out.append(
                "{%- if messages and messages[0]['role'] not in ['system', 'text'] -%}"
                "{%- set messages = [{'role': 'system', 'content': "
                + lit(self.default_system)
                + "}] + messages -%}{%- endif -%}"
            )
        out += ["{%- for message in messages -%}", "{%- set role = message['role'] -%}"]
        out.append("{%- if false -%}")
        out.append(
            emit(TEXT_ROLE, RoleFormat("", self.text_suffix, train=True), "message['content']")
        )
        if self.system == "merge":
            out.append(
                "{%- elif role == 'system' -%}{%- set ns.sys = ns.sys + message['content'] + "
                + lit(self.system_separator)
                + " -%}"
            )
        elif self.system == "drop":
            out.append("{%- elif role == 'system' -%}")
        for role in ROLES:
            if role == "system" and self.system != "role":
                continue
            fmt = self.roles.get(role)
            if fmt is None:
                out.append("{%- elif role == " + lit(role) + " -%}")
            elif role == "user" and self.system == "merge":
                out.append(
                    emit(role, fmt, "ns.sys + message['content']", "{%- set ns.sys = '' -%}")
                )
            else:
                out.append(emit(role, fmt, "message['content']"))
        out.append("{%- else -%}{{- raise_exception('Unknown role: ' + role) -}}{%- endif -%}")
        out.append("{%- endfor -%}")
        out.append(
            "{%- if add_generation_prompt -%}{{- ns.pending + "
            + lit(self.gen_prefix)
            + " -}}{%- endif -%}"
        )
        return "".join(out)


def _chat(
    name: str,
    system_format: tuple[str, str] | None,
    user: tuple[str, str],
    assistant: tuple[str, str],
    assistant_after: str = "",
    **kwargs: Any,
) -> ChatTemplate:
    roles = {
        "user": RoleFormat(*user),
        "assistant": RoleFormat(*assistant, train=True, after=assistant_after),
    }
    if system_format is not None:
        roles["system"] = RoleFormat(*system_format)
    return ChatTemplate(name=name, roles=roles, **kwargs)


TEMPLATES: dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate) -> ChatTemplate:
    """Add a template to the registry (``model.chat_template=<name>``)."""
    TEMPLATES[template.name] = template
    return template


for _template in (
    # open-instruct's Tulu format (also OLMo-2's, which starts with BOS = <|endoftext|>).
    _chat(
        "tulu",
        ("<|system|>\n", "\n"),
        ("<|user|>\n", "\n"),
        ("<|assistant|>\n", "{eos}"),
        assistant_after="\n",
    ),
    _chat(
        "olmo",
        ("<|system|>\n", "\n"),
        ("<|user|>\n", "\n"),
        ("<|assistant|>\n", "{eos}"),
        assistant_after="\n",
        bos="{bos}",
    ),
    _chat(
        "chatml",
        ("<|im_start|>system\n", "<|im_end|>"),
        ("<|im_start|>user\n", "<|im_end|>"),
        ("<|im_start|>assistant\n", "<|im_end|>"),
        separator="\n",
        stop_tokens=("<|im_end|>",),
    ),
    _chat(
        "llama3",
        ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        bos="{bos}",
        stop_tokens=("<|eot_id|>",),
    ),
    _chat(
        "zephyr",
        ("<|system|>\n", "{eos}"),
        ("<|user|>\n", "{eos}"),
        ("<|assistant|>\n", "{eos}"),
        separator="\n",
    ),
    # Mistral [INST] format: no system role; the system prompt opens the first user turn.
    _chat(
        "mistral",
        None,
        ("[INST] ", " [/INST]"),
        (" ", "{eos}"),
        bos="{bos}",
        system="merge",
    ),
    _chat(
        "simple_chat",
        ("System: ", "\n\n"),
        ("User: ", "\n\n"),
        ("Assistant: ", "{eos}"),
        assistant_after="\n\n",
    ),
    # Every message's content back to back, separated by blank lines; completions trained.
    _chat("simple_concat", ("", ""), ("", ""), ("", "{eos}"), separator="\n\n"),
    # Only assistant messages are rendered (and trained); system and user are dropped.
    ChatTemplate(
        name="assistant_only",
        roles={"assistant": RoleFormat("", "{eos}", train=True)},
        system="drop",
    ),
):
    register_template(_template)


def template_from_mapping(spec: Mapping[str, Any], name: str = "yaml") -> ChatTemplate:
    """A YAML-defined template: the fields of :class:`ChatTemplate`, roles as mappings."""
    spec = dict(spec)
    known = set(ChatTemplate.__dataclass_fields__)
    unknown = set(spec) - known
    if unknown:
        raise ConfigError(
            f"model.chat_template: unknown keys {sorted(unknown)}; known: {sorted(known)}"
        )
    roles_spec = spec.pop("roles", None)
    if not isinstance(roles_spec, Mapping):
        raise ConfigError("model.chat_template.roles: a mapping role -> {prefix, suffix, train}")
    roles = {}
    for role, fmt in roles_spec.items():
        fmt = dict(fmt or {})
        bad = set(fmt) - {"prefix", "suffix", "train", "after"}
        if bad:
            raise ConfigError(f"model.chat_template.roles.{role}: unknown keys {sorted(bad)}")
        roles[role] = RoleFormat(
            prefix=str(fmt.get("prefix", "")),
            suffix=str(fmt.get("suffix", "")),
            train=bool(fmt.get("train", role == "assistant")),
            after=str(fmt.get("after", "")),
        )
    spec.setdefault("name", name)
    if "stop_tokens" in spec:
        spec["stop_tokens"] = tuple(spec["stop_tokens"] or ())
    return ChatTemplate(roles=roles, **spec)


def resolve_template(spec: Any) -> ChatTemplate | str | None:
    """``model.chat_template`` → a :class:`ChatTemplate`, a Jinja string, or ``None`` (the
    tokenizer's own)."""
    if spec is None or spec == "tokenizer":
        return None
    if isinstance(spec, Mapping):
        return template_from_mapping(spec)
    if isinstance(spec, str):
        if "{%" in spec or "{{" in spec:
            return spec
        if spec in TEMPLATES:
            return TEMPLATES[spec]
        raise ConfigError(
            f"model.chat_template {spec!r} is not a known template; available: "
            f"{sorted(TEMPLATES)}, 'tokenizer' (the tokenizer's own), a Jinja string, or a "
            "mapping (YAML-defined template)"
        )
    raise ConfigError(f"model.chat_template: unsupported value {spec!r}")


def check_roles(messages: Sequence[Mapping[str, Any]], where: str) -> None:
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in (*ROLES, TEXT_ROLE):
            raise DataError(f"{where}: messages[{i}].role {role!r} is not one of {ROLES}")
