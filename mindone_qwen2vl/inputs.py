"""Host-side preparation of the model's inputs, in numpy: 3-axis rotary positions and attention masks.

Nothing here touches a device; the model (modeling_qwen2_vl) and generation call these before their graphs.
"""
import numpy as np
from mindspore import Tensor
from mindspore.common import dtype as mstype


def to_numpy(x, dtype=None):
    if x is None:
        return None
    if isinstance(x, Tensor):
        # numpy has no bfloat16: such a tensor is read as float32 (exactly: bf16 values are float32 values).
        x = (x.astype(mstype.float32) if x.dtype == mstype.bfloat16 else x).asnumpy()
    elif hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor handed over from an HF pipeline
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    x = np.asarray(x)
    return x if dtype is None else x.astype(dtype)


def temporal_positions(frames, second_per_grid_t, tokens_per_second):
    """Qwen2.5-VL's temporal position of each video frame (grid step): its time in seconds times
    tokens_per_second, rounded down. Computed in float32 as Qwen's reference and vLLM do, keeping fractional
    seconds (0.5 s per grid step at 25 tokens/s: 0, 12, 25, ...). HF transformers 4.57.1 casts
    second_per_grid_t to an integer first (0.5 -> 0: every frame at time 0); the two agree whenever
    second_per_grid_t is a whole number."""
    t = np.arange(frames, dtype=np.float32) * np.float32(second_per_grid_t) * np.float32(tokens_per_second)
    return t.astype(np.int64)


def check_second_per_grid_ts(second_per_grid_ts, video_grid_thw):
    """second_per_grid_ts as float64 [videos] (1.0 each when None, as HF), or a ValueError naming it; None
    without videos (HF ignores it then)."""
    if video_grid_thw is None:
        return None
    videos = np.asarray(to_numpy(video_grid_thw)).reshape(-1, 3).shape[0]
    if second_per_grid_ts is None:
        return np.ones(videos)
    given = np.asarray(to_numpy(second_per_grid_ts))
    ok = np.issubdtype(given.dtype, np.number) and given.size == videos
    seconds = given.astype(np.float64).reshape(-1) if ok else None
    if not ok or not np.isfinite(seconds).all() or (seconds < 0).any():
        raise ValueError(f"second_per_grid_ts must hold one finite number >= 0 per video ({videos}), got "
                         f"{given.tolist()}")
    return seconds


def get_rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
                   image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   spatial_merge_size=2, second_per_grid_ts=None, tokens_per_second=None):
    """3-axis (temporal, height, width) position ids for M-RoPE, computed on the host.

    Text tokens advance all three axes together. A vision item of grid (t, h, w) becomes t*h*w/4 tokens
    laid out as (t, h/2, w/2); its positions start where the text stopped, each axis counting its own index,
    and the text after it resumes at one past the largest position used. Padding (attention_mask 0) gets 1.

    Qwen2-VL (tokens_per_second None): the temporal index is the frame index. Qwen2.5-VL (tokens_per_second
    given): a video's frame f is at temporal_positions(f, second_per_grid_ts[video], tokens_per_second)
    (second_per_grid_t 1.0 when not given, as HF), an image's at 0.

    Example: one image of grid (1, 4, 4) (2x2 tokens) after 2 text tokens, then 1 text token:
        temporal: 0 1 2 2 2 2 4
        height:   0 1 2 2 3 3 4
        width:    0 1 2 3 2 3 4

    Returns (position_ids [3, B, S] int64, rope_deltas [B, 1] int64), where rope_deltas is the position
    of the next token minus its index in the padded sequence, used to continue positions while decoding.
    """
    ids = to_numpy(input_ids, np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    batch, seq = ids.shape
    seconds = None
    if tokens_per_second is not None:
        seconds = check_second_per_grid_ts(second_per_grid_ts, video_grid_thw)
    mask = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, np.int64).reshape(batch, seq)
    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            pos = np.broadcast_to(np.arange(seq), (3, batch, seq)).copy()
            return pos, np.zeros((batch, 1), np.int64)
        pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
        deltas = pos.max(-1, keepdims=True) + 1 - seq
        return np.broadcast_to(pos, (3, batch, seq)).copy(), deltas.astype(np.int64)

    grids = {
        image_token_id: iter(np.asarray(to_numpy(image_grid_thw) if image_grid_thw is not None else [],
                                        np.int64).reshape(-1, 3)),
        video_token_id: iter(np.asarray(to_numpy(video_grid_thw) if video_grid_thw is not None else [],
                                        np.int64).reshape(-1, 3)),
    }
    video_index = 0
    position_ids = np.ones((3, batch, seq), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    for b in range(batch):
        tokens = ids[b][mask[b] == 1]
        n = len(tokens)
        after_start = tokens[np.nonzero(tokens[:-1] == vision_start_token_id)[0] + 1]
        remaining = {k: int((after_start == k).sum()) for k in grids}
        pieces, cursor, next_pos = [], 0, 0
        for _ in range(sum(remaining.values())):
            # The next vision item is whichever pad token (image or video) comes first from the cursor.
            first = {}
            for kind, left in remaining.items():
                hits = np.nonzero(tokens[cursor:] == kind)[0] if left else []
                first[kind] = cursor + int(hits[0]) if len(hits) else n + 1
            kind = min(first, key=first.get)
            start = first[kind]
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(
                    f"row {b} has more {'image' if kind == image_token_id else 'video'} items than grids given"
                ) from None
            remaining[kind] -= 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            text_len = start - cursor
            pieces.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
            base = next_pos + text_len
            times = np.arange(t)
            if tokens_per_second is not None:
                if kind == video_token_id:
                    times = temporal_positions(t, seconds[video_index], tokens_per_second)
                else:
                    times = np.zeros(t, np.int64)
            if kind == video_token_id:
                video_index += 1
            tt, hh, ww = np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + base)
            next_pos = base + max(int(times[-1]), gh - 1, gw - 1) + 1
            cursor = start + t * gh * gw
        if cursor < n:
            pieces.append(np.broadcast_to(np.arange(n - cursor) + next_pos, (3, n - cursor)))
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b] == 1] = row
        deltas[b, 0] = (row.max() + 1 if row.size else 0) - seq
    return position_ids, deltas


def causal_mask(attention_mask, query_len, key_len, past_len=0):
    """Additive float32 mask [B, 1, S, L]: a query at absolute position past_len+i sees keys 0..past_len+i
    that are not padding."""
    q_pos = np.arange(query_len)[:, None] + past_len
    allowed = np.arange(key_len)[None, :] <= q_pos
    allowed = allowed[None] & (attention_mask[:, None, :key_len] == 1)
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]


def _array(value, name):
    try:
        return to_numpy(value)
    except (ValueError, TypeError) as error:  # ragged nested lists, objects numpy cannot hold
        raise ValueError(f"{name} must be a rectangular array of numbers: {error}") from None


def _int_array(value, name):
    arr = _array(value, name)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, beyond any valid value")  # before int64 wraps it
    return arr.astype(np.int64)


def check_media(config, pixels, grid, kind="image", names=None):
    """One kind of media input: pixels [N, C*T*P*P] floating point (bf16 included) and finite, grid [n, 3] of
    t >= 1 and h, w multiples of the merge size, N = sum(t*h*w). -> (pixels float32, grid int64), or a ValueError
    naming the argument (pixel_values / pixel_values_videos, image_grid_thw / video_grid_thw, or `names`)."""
    vision = config.vision_config
    pname, gname = names or ("pixel_values" if kind == "image" else "pixel_values_videos", f"{kind}_grid_thw")
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    g = _int_array(grid, gname)
    if g.ndim == 1 and g.size == 3:
        g = g[None]
    if g.ndim != 2 or g.shape[1] != 3 or len(g) == 0:
        raise ValueError(f"{gname} must be [items, 3] (t, h, w per {kind}), got shape {tuple(g.shape)}")
    merge = vision.spatial_merge_size
    if (g < 1).any() or (g[:, 1:] % merge).any():
        row = int(np.nonzero((g < 1).any(-1) | (g[:, 1:] % merge).any(-1))[0][0])
        raise ValueError(f"{gname} row {row} is {g[row].tolist()}: t, h and w must be >= 1 and h, w multiples of "
                         f"{merge}")
    p = _array(pixels, pname)
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{pname} must be floating point, got dtype {p.dtype}")
    patches = sum(int(t) * int(h) * int(w) for t, h, w in g.tolist())  # Python ints: no int64 overflow
    if p.ndim != 2 or p.shape != (patches, width):
        raise ValueError(f"{pname} must be [{patches}, {width}] for {gname} {g.tolist()} (patches x channels * "
                         f"temporal patch * patch^2), got shape {tuple(p.shape)}")
    p = p.astype(np.float32, copy=False)  # float32 pixels are not copied: nothing writes into them
    if not np.isfinite(p).all():
        raise ValueError(f"{pname} holds {int((~np.isfinite(p)).sum())} values that are not finite (NaN or inf)")
    return p, g


def check_inputs(config, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None):
    """The model's inputs checked before any device work, each problem a ValueError naming the argument, what
    was expected and what was found. -> (input_ids [B, S] int64, attention_mask [B, S] int64, images, videos),
    images and videos each None or (pixels [N, C*T*P*P] float32, grid [n, 3] int64)."""
    if input_ids is None:
        raise ValueError("input_ids is required (the processor's output: model(**inputs) / model.generate(**inputs))")
    given = _array(input_ids, "input_ids")
    if given.size == 0:  # an empty prompt comes from the processor as float64 [1, 0]
        raise ValueError(f"input_ids is empty (shape {tuple(given.shape)}): no prompt to start from")
    ids = _int_array(given, "input_ids")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    vocab = config.text_config.vocab_size
    bad = np.argwhere((ids < 0) | (ids >= vocab))
    if len(bad):
        b, s = bad[0]
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the vocabulary), found {int(ids[b, s])} at "
                         f"[{b}, {s}]" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = _int_array(attention_mask, "attention_mask")
        if mask.size != ids.size:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got "
                             f"{tuple(mask.shape)}")
        mask = mask.reshape(ids.shape)
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask must hold 0 and 1 only, found {sorted(set(np.unique(mask)) - {0, 1})}")
        empty = np.nonzero(~mask.any(-1))[0]
        if len(empty):
            raise ValueError(f"attention_mask rows {empty.tolist()} are all padding")
    media = []
    for kind, pixels, grid in (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw)):
        if pixels is None and grid is None:
            media.append(None)
            continue
        if pixels is None or grid is None:
            pname = "pixel_values" if kind == "image" else "pixel_values_videos"
            gname = f"{kind}_grid_thw"
            raise ValueError(f"{pname} and {gname} go together: got only {gname if pixels is None else pname}")
        media.append(check_media(config, pixels, grid, kind))
    return ids, mask, media[0], media[1]
