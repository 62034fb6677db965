"""Chat templates: how a conversation's turns become the text a model reads.

``RWKV_CHAT`` is ChatRWKV's format (``v2/chat.py``): ``"User: {message}\\n\\nAssistant:"``, the reply ending
at ``"\\n\\n"``, which is fed to the state so the next exchange starts where the reply ended. Transformer
families (Qwen2) render a Jinja2 template from their ``tokenizer_config.json`` behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RWKVChatTemplate:
    """ChatRWKV's plain-text chat format.

    Attributes:
        stop: the text that ends a reply (and is fed to the state after it).
        stop_tokens: token ids that end a reply when sampled: none (the reply ends at the text ``stop``).
    """

    stop: str = "\n\n"
    stop_tokens: tuple[int, ...] = ()

    def prompt(self, message: str) -> str:
        """The text fed for one user message, up to where the reply starts."""
        return f"User: {message}\n\nAssistant:"

    def system(self, system_prompt: str) -> str:
        """The text fed once at the start of a conversation for its system prompt ("" for none)."""
        return system_prompt + "\n\n" if system_prompt else ""

    def after_stop(self, token: int) -> str:
        """The text fed after a reply that ended by sampling ``token`` of ``stop_tokens``: "" (there are none)."""
        return ""

    def transcript(self, system_prompt: str, pairs: list[tuple[str, str]]) -> str:
        """A whole conversation as the model saw it (to rebuild a state from the stored turns).

        Args:
            system_prompt: the conversation's system prompt ("" for none).
            pairs: (user message, assistant reply) in order.
        """
        out = self.system(system_prompt)
        for user, assistant in pairs:
            out += self.prompt(user) + " " + assistant + self.stop
        return out


RWKV_CHAT = RWKVChatTemplate()
