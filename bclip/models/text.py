"""Text tower of OpenAI CLIP: a causal pre-norm transformer pooled at the end-of-text token."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bclip.models.vit import Dtype, Transformer, layer_norm


def end_of_text_positions(tokens: jax.Array, eot_token_id: int) -> jax.Array:
    """Index of the first end-of-text token in each row: tokens [B, L] int -> [B] int32.

    A row without one (which the tokenizer never produces) pools at its last position.
    """
    is_end = tokens == eot_token_id
    first_end = jnp.argmax(is_end, axis=-1)
    last_position = tokens.shape[-1] - 1
    return jnp.where(is_end.any(axis=-1), first_end, last_position).astype(jnp.int32)


class TextTransformer(nn.Module):
    """Token + positional embedding, causal transformer, ln_final, and the bias-free
    text_projection applied at the end-of-text position."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    eot_token_id: int | None = None  # None: vocab_size - 1, as in OpenAI's tokenizer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [B, L] with L <= context_length -> features [B, output_dim]."""
        length = tokens.shape[-1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        embedded = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embedding",
        )(tokens)
        positional_embedding = self.param(
            "positional_embedding",
            nn.initializers.normal(0.01),
            (self.context_length, self.width),
            self.param_dtype,
        )
        hidden = embedded + positional_embedding[:length].astype(self.dtype)
        # The causal mask is what makes padding harmless: nothing after the end-of-text
        # token can reach the pooled position, so no padding mask is needed.
        hidden = Transformer(
            layers=self.layers,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            is_causal=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )(hidden)
        eot_token_id = self.vocab_size - 1 if self.eot_token_id is None else self.eot_token_id
        positions = end_of_text_positions(tokens, eot_token_id)
        pooled = jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]
        # ln_final normalises each token on its own, so normalising only the pooled token gives
        # CLIP's result without normalising the other L - 1 positions.
        pooled = layer_norm(self.dtype, self.param_dtype, "ln_final")(pooled)
        projection = self.param(
            "text_projection",
            nn.initializers.normal(self.width**-0.5),
            (self.width, self.output_dim),
            self.param_dtype,
        )
        return pooled @ projection.astype(self.dtype)
