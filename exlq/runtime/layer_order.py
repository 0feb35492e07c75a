"""Layer lists such as "0-15,8-23,16-31": which decoder layers run, in which order.

Users score layer merges ("frankenmerges") without copying weights: repeated layers share
their weights (`DecoderOnlyLM.set_layer_order`), and each position gets its own cache slot.
"""

from __future__ import annotations

from exlq.errors import ExlqError


def parse_layer_list(text: str, num_layers: int | None = None) -> list[int]:
    """'0-3,2-5,7' -> [0, 1, 2, 3, 2, 3, 4, 5, 7]; ranges are inclusive.

    With `num_layers`, every layer must be in 0..num_layers-1 (DecoderOnlyLM.set_layer_order
    checks that too, so the syntax can be checked before the model is loaded).
    """
    order: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            if "-" in item:
                first, last = (int(x) for x in item.split("-", 1))
                if first > last:
                    raise ValueError
                order.extend(range(first, last + 1))
            else:
                order.append(int(item))
        except ValueError:
            raise ExlqError(f"bad layer list {text!r}: items are N or FIRST-LAST (FIRST <= LAST), comma-separated") from None
    bad = [] if num_layers is None else sorted({i for i in order if not 0 <= i < num_layers})
    if bad:
        raise ExlqError(f"layer list {text!r} names layers {bad} but the model has layers 0..{num_layers - 1}")
    return order
