"""The ketama ring: compiled (``dispa._rust.Ring``) and pure (``_ring_py.Ring``) twins.

Every behavioural test runs against both (``ring_cls`` fixture); ``test_twins_agree`` compares
them on random inputs, and the nginx golden trace pins both to real nginx behaviour.
"""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispa import _rust  # imported directly: a missing build fails here, it never skips
from dispa.balancer import _ring_py

RUST = _rust.Ring

IMPLS = [pytest.param(RUST, id="rust"), pytest.param(_ring_py.Ring, id="py")]


@pytest.fixture(params=IMPLS)
def ring_cls(request):
    return request.param


def _nodes(n: int, seed: int = 0, weight: int = 1) -> list[tuple[str, int]]:
    return [(f"10.{seed}.0.{i + 1}:8080", weight) for i in range(n)]


KEYS = [f"/objects/{i}?v=1".encode() for i in range(20_000)]


def _cv(ring, keys=KEYS) -> float:
    counts = [0] * len(ring)
    for i in ring.lookup_many(keys):
        counts[i] += 1
    return statistics.pstdev(counts) / statistics.mean(counts)


# --------------------------------------------------------------------------- construction

def test_len_is_node_count(ring_cls):
    assert len(ring_cls(_nodes(7))) == 7
    assert len(ring_cls([("a:1", 3)], points_per_weight=1)) == 1


@pytest.mark.parametrize("nodes, ppw", [
    ([], 160),
    ([("a:1", 1), ("b:1", 0)], 160),
    ([("a:1", -3)], 160),
    ([("a:1", 1)], 0),
    ([("a:1", 2**31)], 160),  # more than MAX_POINTS
])
def test_bad_input_is_value_error(ring_cls, nodes, ppw):
    with pytest.raises(ValueError):
        ring_cls(nodes, points_per_weight=ppw)


def test_malformed_nodes_are_type_error(ring_cls):
    with pytest.raises(TypeError):
        ring_cls("a:1")
    with pytest.raises(TypeError):
        ring_cls([(b"a:1", 1)])
    with pytest.raises(TypeError):
        ring_cls([("a:1", "1")])


def test_points_per_weight_is_keyword_only(ring_cls):
    with pytest.raises(TypeError):
        ring_cls([("a:1", 1)], 160)


def test_keys_must_be_bytes(ring_cls):
    ring = ring_cls(_nodes(3))
    with pytest.raises(TypeError):
        ring.lookup("text")
    with pytest.raises(TypeError):
        ring.lookup_many([b"ok", "text"])


@pytest.mark.parametrize("name, host, port", [
    (b"127.0.0.1:8081", b"127.0.0.1", b"8081"),
    (b"[::1]:80", b"[::1]", b"80"),
    (b"backend", b"backend", b""),
    (b"UNIX:/tmp/a.sock", b"/tmp/a.sock", b""),
    # nginx scans back over digits and wants ':' right before them; otherwise no port.
    (b"[::1]", b"[::1]", b""),
    (b"a:b", b"a:b", b""),
    (b"a:8b0", b"a:8b0", b""),
    (b"host:", b"host", b""),
    (b"8080", b"8080", b""),
])
def test_host_port_split_is_nginxs(name, host, port):
    assert _ring_py._split_host_port(name) == (host, port)


def test_names_without_a_port_hash_whole_in_both_twins():
    # "[::1]" must not be split at its last ':' (that would hash host "[:", port ":1]").
    nodes = [("[::1]", 1), ("a:b", 2), ("backend", 1), ("10.0.0.1:80", 1)]
    assert RUST(nodes).lookup_many(KEYS[:3000]) == _ring_py.Ring(nodes).lookup_many(KEYS[:3000])


# --------------------------------------------------------------------------- lookups

def test_deterministic(ring_cls):
    a, b = ring_cls(_nodes(5)), ring_cls(_nodes(5))
    assert a.lookup_many(KEYS[:2000]) == b.lookup_many(KEYS[:2000])
    assert [a.lookup(k) for k in KEYS[:2000]] == a.lookup_many(KEYS[:2000])


def test_lookup_n_is_the_failover_walk(ring_cls):
    ring = ring_cls(_nodes(5))
    for k in KEYS[:500]:
        walk = ring.lookup_n(k, 10)
        assert sorted(walk) == [0, 1, 2, 3, 4]
        assert walk[0] == ring.lookup(k)
        assert ring.lookup_n(k, 2) == walk[:2]
        assert ring.lookup_n(k, 0) == []


def test_lookup_n_negative_is_overflow_error(ring_cls):
    with pytest.raises(OverflowError):
        ring_cls(_nodes(2)).lookup_n(b"k", -1)


def test_single_node_owns_everything(ring_cls):
    ring = ring_cls([("only:1", 1)])
    assert set(ring.lookup_many(KEYS[:1000])) == {0}
    assert ring.lookup_n(b"x", 3) == [0]


# --------------------------------------------------------------------------- the twins agree

node_lists = st.lists(
    st.tuples(st.text(min_size=0, max_size=24), st.integers(min_value=1, max_value=5)),
    min_size=1, max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(nodes=node_lists, ppw=st.integers(min_value=1, max_value=200),
       keys=st.lists(st.binary(max_size=64), min_size=1, max_size=40), n=st.integers(0, 14))
def test_twins_agree(nodes, ppw, keys, n):
    rust = RUST(nodes, points_per_weight=ppw)
    py = _ring_py.Ring(nodes, points_per_weight=ppw)
    assert len(rust) == len(py)
    assert rust.lookup_many(keys) == py.lookup_many(keys)
    for k in keys:
        assert rust.lookup(k) == py.lookup(k)
        assert rust.lookup_n(k, n) == py.lookup_n(k, n)


# --------------------------------------------------------------------------- distribution
#
# Ketama's balance is statistical: a node's share of the circle has a relative spread of
# about 1/sqrt(points). With nginx's 160 points per weight that is ~8% (measured: mean CV
# 7.0% over 30 node sets of 10, worst 9.8%); 1000 points bring it to ~3%. The bounds below
# follow that theory rather than one lucky node set.

def test_load_spread_with_160_points(ring_cls):
    cvs = [_cv(ring_cls(_nodes(10, seed))) for seed in range(8)]
    assert statistics.mean(cvs) < 0.09, cvs
    assert max(cvs) < 0.13, cvs


def test_load_cv_below_5_percent_with_1000_points(ring_cls):
    keys = [f"key-{i}".encode() for i in range(100_000)]
    for seed in range(3):
        assert _cv(ring_cls(_nodes(10, seed), points_per_weight=1000), keys) < 0.05


@pytest.mark.parametrize("ppw", [160, 1000])
def test_weights_are_honoured(ring_cls, ppw):
    weights = [1, 2, 3, 4]
    ring = ring_cls([(f"192.168.1.{i + 1}:80", w) for i, w in enumerate(weights)], points_per_weight=ppw)
    keys = [f"key-{i}".encode() for i in range(100_000)]
    counts = [0] * 4
    for i in ring.lookup_many(keys):
        counts[i] += 1
    for i, w in enumerate(weights):
        share, want = counts[i] / len(keys), w / sum(weights)
        # within 5% at 1000 points; a 3-sigma ketama bound (3/sqrt(points)) at nginx's 160
        tol = 0.05 if ppw == 1000 else 3 / (ppw * w) ** 0.5
        assert abs(share - want) / want < tol, (i, share, want)


def test_removing_one_of_ten_moves_only_its_keys(ring_cls):
    nodes = _nodes(10)
    full = ring_cls(nodes)
    before = full.lookup_many(KEYS)
    moved_fractions = []
    for gone in range(10):
        rest = [i for i in range(10) if i != gone]
        less = ring_cls([nodes[i] for i in rest])
        after = [rest[i] for i in less.lookup_many(KEYS)]
        moved = [k for k, a, b in zip(KEYS, before, after) if a != b]
        # Minimal disruption: exactly the removed node's keys move, to their next node.
        assert len(moved) == before.count(gone)
        for k in moved[:200]:
            assert after[KEYS.index(k)] == full.lookup_n(k, 2)[1]
        moved_fractions.append(len(moved) / len(KEYS))
    assert abs(statistics.mean(moved_fractions) - 0.1) < 0.01  # ~1/N, within 10%
    assert all(abs(f - 0.1) < 0.03 for f in moved_fractions), moved_fractions


def test_adding_an_eleventh_node_moves_about_one_eleventh(ring_cls):
    nodes = _nodes(10)
    before = ring_cls(nodes).lookup_many(KEYS)
    fractions = []
    for extra in range(10):
        after = ring_cls(nodes + [(f"172.16.0.{extra + 1}:8080", 1)]).lookup_many(KEYS)
        moved = [(a, b) for a, b in zip(before, after) if a != b]
        assert all(b == 10 for _, b in moved)  # keys only move onto the new node
        fractions.append(len(moved) / len(KEYS))
    want = 1 / 11
    assert abs(statistics.mean(fractions) - want) / want < 0.10, fractions


# --------------------------------------------------------------------------- nginx golden trace

# Captured from nginx 1.22.1 with
#     upstream pool { hash $arg_k consistent;
#         server 127.0.0.1:18081; server 127.0.0.1:18082;
#         server 127.0.0.1:18083 weight=2; server 127.0.0.1:18084; }
# and each server answering its index; then again with `127.0.0.1:18083 ... down`.
# Each line: `|key owner owner_with_node_2_down` (the `|` keeps the empty key; no `k` arg).
NGINX_NODES = [("127.0.0.1:18081", 1), ("127.0.0.1:18082", 1), ("127.0.0.1:18083", 2), ("127.0.0.1:18084", 1)]
NGINX_TRACE = """
| 2 0
|a 2 1
|hello 2 0
|user-42 0 0
|/objects/0 1 1
|/objects/1 1 1
|/objects/2 1 1
|/objects/3 1 1
|/objects/4 2 1
|/objects/5 2 1
|/objects/6 2 3
|/objects/7 2 1
|/objects/8 2 3
|/objects/9 2 0
|/objects/10 2 1
|/objects/11 0 0
|/objects/12 2 0
|/objects/13 0 0
|/objects/14 2 3
|/objects/15 3 3
|/objects/16 2 1
|/objects/17 0 0
|/objects/18 2 0
|/objects/19 2 0
|/objects/20 1 1
|/objects/21 1 1
|/objects/22 3 3
|/objects/23 0 0
|/objects/24 2 1
|/objects/25 0 0
|/objects/26 1 1
|/objects/27 3 3
|/objects/28 2 3
|/objects/29 2 0
|/objects/30 2 3
|/objects/31 1 1
|/objects/32 3 3
|/objects/33 0 0
|/objects/34 2 3
|/objects/35 1 1
|/objects/36 2 0
|/objects/37 1 1
|/objects/38 3 3
|/objects/39 0 0
|/objects/40 2 3
|/objects/41 2 0
|/objects/42 3 3
|/objects/43 3 3
|/objects/44 2 0
|/objects/45 0 0
|/objects/46 2 1
|/objects/47 0 0
|/objects/48 2 0
|/objects/49 2 3
|/objects/50 3 3
|/objects/51 0 0
|/objects/52 2 3
|/objects/53 0 0
|/objects/54 3 3
|/objects/55 2 3
|/objects/56 0 0
|/objects/57 3 3
|/objects/58 2 3
|/objects/59 3 3
|/objects/60 2 3
|/objects/61 0 0
|/objects/62 0 0
|/objects/63 0 0
|/objects/64 2 3
|/objects/65 2 0
|/objects/66 2 1
|/objects/67 3 3
|/objects/68 3 3
|/objects/69 3 3
|/objects/70 0 0
|/objects/71 3 3
|/objects/72 2 3
|/objects/73 2 1
|/objects/74 2 3
|/objects/75 2 3
|/objects/76 0 0
|/objects/77 1 1
|/objects/78 2 0
|/objects/79 3 3
|/objects/80 3 3
|/objects/81 1 1
|/objects/82 0 0
|/objects/83 2 1
|/objects/84 0 0
|/objects/85 0 0
|/objects/86 0 0
|/objects/87 2 3
|/objects/88 1 1
|/objects/89 3 3
|/objects/90 2 0
|/objects/91 2 3
|/objects/92 3 3
|/objects/93 3 3
|/objects/94 1 1
|/objects/95 2 1
|/objects/96 3 3
|/objects/97 3 3
|/objects/98 1 1
|/objects/99 2 0
|ombYXUhDTm.y9IUfpD011RvlQCy2ds 3 3
|WWHNCC_I8VAh 0 0
|DkjlmUoaYaLZV 1 1
|vfCnABW1Z9gVPgZ36he38 0 0
|hZ.hMH0qP-fe 3 3
|s3ndiA 1 1
|S-StkTZE5Zbj4u.jQiw 3 3
|hi7-Z 0 0
|_7.mWtBrE3C4qQLAAIjd24DIL0OuHSny0DrNx/N 0 0
|mJA4luSa8AIJoxOqIOKz.90IsT-upEhb5d8 1 1
|HObYvJMr44 2 0
|Qh9PpuA 2 1
|J 1 1
|yE.2S.0LaX 2 1
|tGT_VDzhaD0kyxspHDn.Ka7.WxY 2 3
|hGAl9ZA 3 3
|PT38zEtOG6OZr9cArC_bM2iC.ScT 0 0
|nopEel62/EXo0fi-p3svcRRhPvL-IIg 0 0
|E.MoKML-oZXunRu_byn_ 2 1
|vFjNhUg 1 1
|xmvuloOowaSl/OA31veP8jxWv 2 0
|h2VoqNVHgxNZRUWZF0X9zx20zshFF7. 2 3
|.ZQ5_q.GuZY2_3fEwAZdR5i097JBsfEP7 3 3
|5 0 0
|sB9eYHcHaq9-Zk 0 0
|sTNF1t3agmy0s/X2kYtY 0 0
|MsVf 2 1
|SXqTn1cJf8s/69P1nqJrh86Z1jg 2 0
|CCxtc.1uM-Yv-LKI 2 1
|.ul3c.kER 2 0
|QCLpeX54e8eWuT9IbVohR2/jE/kxVUpD6-PBs./ 1 1
|AyEFrrqOZuRBo8H7Kpg 3 3
|CWZT 3 3
|jOhHQEten2BFLfko3VlxJZ-NpANyax2R64p 2 3
|KJo.rT14FcL.HaxHekDV5OGD 0 0
|GEcIzzOLWON8oc/11J8Ir8KKJtW7NLQNWR 3 3
|mfjvakbXj/dJ5VTqGSjlaZ.aOQ2UFBSujhc/SvxR 1 1
|dq48veo 2 3
|DhnLrP7iFy3N1CgEshVlM9YxUUMWqBEqw1xPyHj1 0 0
|ZqcStTdnDO6wa3rUyKLVBf0tWHV 2 1
|48fKJYCOF7 3 3
|FFbFgJ6GmPsgZQuFh6Lede 2 0
|cyTp 2 3
|301ITL28.UOh6hG41.z.Gn_x5NVzaLZV85bg 2 0
|bkT8FS5o_I/b54QaHM5b/uSb3B 0 0
|/CZ2vSnktGNdESQ8sRD0S6TY4JWIvKoc 1 1
|fGhtK3JvxUW8JgYjSz_L-o0VKMRkjTFG8dd 1 1
|.bsr6xwqZ1YAgh2 1 1
|d3ewZIpQjhqn3T1xtIBJp9.pvaZTK 3 3
|ng9u0kG5dO1kU.lssbwNnULQCc 2 3
|pLwq5HwFIMB 2 3
|j3dxlxEP3RSm77J-_AoKHaCYVeiXubeRUjkI 3 3
|IkNcp4XwdrUnDAK9u1l0/iRnWD-knTu-zabQP_a 2 1
|ICKkISrGrp3hZK3Ep7EN6v2TSaFfmNvF 2 3
|BqC1i7xDRxWPQX/hZW.KaZXuJR88KV 3 3
|IwFNc.bfj5Pxs 3 3
|u06aDaUPG5cI-a4_ZpVzef 3 3
|X7Eh3QfGiqA-GxdiDgzkjiya9L0_t.rXM_uc 2 1
|U5DL6l_e5VadLEQ2Z4dJ6H 0 0
|ck5gTDW/75WiMe6UqJ0.P2H0KMuaqaOf 1 1
|ETP-daTNOIx 0 0
|E/Be7qOnyuxEQ76e2Dxxr4QfG/jFxrp 2 3
|jWoAXK8AclS 0 0
|0Lnm.CO6PlCa5L 0 0
|xdoZ/d0DkeryvYX4r3 3 3
|_TzUjE/K-yb 2 1
|iJdhPXRzQ3A4ot_p_NgjIPJD3oyaGa 3 3
|.k66u 2 3
|0h6pRG 2 1
|/IwpEwCM 2 0
|kBMFZcJxFa3qkMwMHx9uER1 2 0
|jSk 1 1
|kiMDP6wYIsaXXr9ZwqUhCCiRLCN.4bfcjsEQObF 2 3
|ZGxOPrcxL5wTBBFRNTUW 2 0
|AonaGVisA 3 3
|/onW6i/.iRDFcDQpy9A-gVDnzipBWLcm33bC 0 0
|9sTV1/mBqgIKn/kS-IQGhLH7wFLwBTy 3 3
|uGGYUxfmolF6jw 3 3
|aYHPb_9WY0.exIAYJxoo.C_VE1VHBA.9bw03jc 3 3
|bYN-22Zg7GJiX2Fjs 3 3
|V/n/AFsP 2 3
|Fuh4e9 1 1
|FWdYzE 1 1
|3_61H7W8hADX 3 3
|yc4.bJh 2 0
|pH2c0YN._VU7n 2 1
|x8Md 0 0
|e 2 0
|_Ngc7MUpJ 2 3
|xeVzaHzHgmg8v_C.4gg-BuI28Mb-gLvu-KSmM 3 3
|_1bjLeAXK8PGA-NgZ 2 1
|UWyGfGnqreYE_Pkz-IREzKjWAzBAhv 0 0
|hlVA5hvCCKh7QnlLF/Tj/ 2 0
|GCR6IlB2uMbnz_dMiUyxjNQmeEf3pDBrPe 1 1
|v/sRPc0iZRibXqa_aak 2 3
|Kn-/GU0lDBEzBASbn 0 0
|CzJl 2 1
|Y/ivz6Xv/3LKzANbck 0 0
|k_kVBg20lh5kwvUKH-dVlsh4okYtsN 2 0
|_NxjCg7ACpo60GIuJc6Xs7rxGJJc12/UyFq.NhN 0 0
|/-xXiTpaC5V9SaU698aStCDFEtGBHfi/-6 0 0
|u80ZTIJqtA2yuEu9Jq6jvcmSa-po 0 0
|nxrOdVjWVh-fYzYau1YD_WCAZqJGe1V_cJEu 2 0
|2Bte_Jd5nylYgNpxg 0 0
|wz9xsS0.EHVEA9KuTMw/ 2 1
|1 2 0
|LrYVStLtzi5.4-B/tAw9ROqY7Xz 0 0
|w0R05 2 3
|Ern.wsV4MueHxh3h-enxwIzMb-knMKyew3/iOi-V 2 3
|p.urX-hGbvMzdL9434oEAPygn9AOYvRy2YUnEG/5 0 0
|-FWqGZ1bR5t5zqYK1go_pXGyKjp7S0xC/Ie 3 3
|jWOvvHaX9iCeCHUHbeBJ8zlZ0oUXLhDo 0 0
|Pb9HCe_RSthB8qHZ 3 3
|ZEIClyv./KoOoDSXhUKK3lVgLp3ev1 3 3
|WcdcZZMo-0DIfPSn_qFLLsfe-Qm- 2 1
|YVihvSfvNm1Kh1r6H5m2_rn.7M5DxABtSpBP7l 0 0
|veCI9.1n/-oHcKo2s 2 1
|WS0y9wjYSAIvJuhmkbax/5Dxy1EjGhM_B2L 3 3
|SkW9rOX0LJs 2 1
|9 1 1
|pjg1xQTda-mazRm4QFY78agvjeeLrmqvs7Q 1 1
|p7pdHagvvs9 0 0
|dUSe-jIgjPSGsfFiwL9UE 2 3
|ZJChFGeKsnCyPp.teOaMIMZgWOBfQmOU 1 1
|2DRk2XNIGOwnQPNC3m1RyzQluU 1 1
|5-NQIfmQuyq6pWb1i8wlgwyRE7ApCE1B2Abxr 0 0
|lTls5Gz1eBGYtsT2dNj 2 0
|2IePz4d_PJ7/nI 3 3
|TrkCq4KXNxWusudjB6L 0 0
|X0a-pSRCJsPsl5ejx.5IWlsp8xO 3 3
|7dqbyXQC8 0 0
|wBqzBi8p9s6y_/Bd/4wL/v 1 1
|j2o 3 3
|RTKqBVDvL6q5fhZOo65f 0 0
|WNXDJep52aGhAi.OAkhWlqUOGa 1 1
|M2fY6rR1oPfMnW9rnXi0juAbF 0 0
|hW7xYc8BlqjHGpkPpZvYH4Jd 2 3
|o9LPsZS7eFGtbiHQnGJoRHT 2 3
|a9kqS2wRp_vPamnb6FcwpEYgF6x8BuDKwyxVv 1 1
|R/ToIUkEqrdLqMv3T 1 1
|EWb1HDcZFAu7zS7YKT/BpE9fwbqh3S3tnbcHI 1 1
|RV_zYEzKG_KlCHbzcD_Zc1ItSM 3 3
|M-OcbX-FxPfhzNj3KVtOlP0e 2 3
|Rka_SCFRuif 2 1
|1 2 0
|A0YQ7Uo 1 1
|__oRZAZQKO_4FMj49H/cO0MpJAD 2 1
|DyTQoml0sA/6 1 1
|kjP9d3ALE3eRu-OFhJY/5ZQpYe3uAxIdj0tX 0 0
|kBbiTq7EUo2UVuUK.zC42j_ 1 1
|Zhdh13qOEu1oKod1Y/hi 3 3
|-kOtp4nGQ5DFaqWCnJCvgXK 2 3
|W5SBzKbT-o0Hq9Dj 2 3
|E0vFHeffE0QyEl_kH 2 0
|QEEnT71KF1atJNP6yMMj4 0 0
|vjhio8OXW6m9.YXsCQbbdF4cGN8Gu 1 1
|0Yv_srVlKyx7bwUvpZBswmvid5I1 3 3
|1JKN 2 0
|QbBWdZUudhWNp.EIyC4xfOrAr_ 3 3
|f.SSCz2YcxK3z8T303z8EMiiIFZAa2yOS8ixj_eJ 2 3
|HWsFbh.vOiTW.J32qTzG1k-d 0 0
|-Y.k.Wh 2 1
|carsVbAPmVUXM 2 1
|N-2p3w6_l7ggk2oSGIdK.UPx0mH 0 0
|wbOrgPK_BoebVt1lWyInkfBfQYs4vK2Qlpfd 3 3
|0rbEr/JudF/f7 0 0
|6Co 3 3
|FYP8-ABR_./YHBA 3 3
|Gv0aOtD 1 1
|47 2 1
|lR6tOgZppjQGK656lj27OEW1Nl3w 3 3
|ke-yKURN 0 0
|w1K.v11K-LpSdIk2oRAGjfBx43Yjy 2 0
|XJ2-B_K-7KrQdJ_gZ00_Azp-qpD93gR3ve 2 1
|Jqz1jgXF6Rj 1 1
|LlFC.PbSm3Cp5VKwzu6WCgyOKp_.s7vYJ 2 0
|FBfd 1 1
|CyVAbdjiRh6L4/5 1 1
|e5BlxBLZTtA 0 0
|fsEy936oXiQFQ7UPIqVeJ/3i_rYBbLLO 2 1
|ybbL.pGkZz1V3z88bE0doqwNgl 1 1
|JKCd 1 1
|sFND_P- 1 1
|135ZHIYuhk_LSpTON6Ji/0MQmDDLWc6 2 0
|SJ.Pe8hp_pT.otR_BszdgCVu.xCtP0w46FHo1gX 2 0
|qsph4BlZqN 0 0
|kVF 2 0
|YO20fSurlYvZBAm4378GrmG39YU4Jv5dUfPj-gfb 2 0
|UQxpDcBR 1 1
|WTUhhilk-s22ROdEnge/xPo2qDcA6N3Cz3qrl 3 3
|JRzIeL7smt8B-d5EiKm3DCSwDUTeUK 2 3
|UCjEwFl 2 3
|4aGXSV7ugube 1 1
|KNatQTn5ZccepqA 2 0
|QXTvQ_dD59uZdlDwzSSjTAi00x_5J 1 1
|mojS7KZ2Ak0G90a_/eiZVGxkfU 3 3
"""


def _trace():
    for line in NGINX_TRACE.strip("\n").splitlines():
        key, up, down = line.rsplit(" ", 2)
        yield key[1:].encode(), int(up), int(down)


def test_nginx_golden_trace(ring_cls):
    ring = ring_cls(NGINX_NODES)
    rows = list(_trace())
    assert len(rows) == 300
    for key, up, down in rows:
        assert ring.lookup(key) == up, key
        assert next(i for i in ring.lookup_n(key, 4) if i != 2) == down, key
