"""The calculator tool that the model calls between `<|python_start|>` and `<|python_end|>`.

`evaluate(expr)` answers arithmetic and letter counting, and nothing else:

- numbers (int and float literals), `+ - * / // % **`, unary `+`/`-`, parentheses;
- `'text'.count('x')` on string literals (SpellingBee-style letter counting).

The expression is parsed with `ast` and the tree is walked here; `eval`/`exec` are never used. Any other
node (names, calls other than the one `.count`, attributes, subscripts, comprehensions, lambdas,
comparisons, strings outside `.count`...) makes the answer None, as does an error (division by zero,
overflow, a complex result).

Nothing can run long because every size is bounded before the work is done: the expression is at most
`MAX_EXPR_CHARS` characters (so at most that many nodes), and an integer operation whose result would
exceed `MAX_INT_BITS` bits is refused before it is computed (`9**9**9`, `2**10000000` are refused in
microseconds). The `timeout` is also checked between nodes, as a second line of defence.

Formatting: an int prints as an int; a float is rounded to 6 decimals and printed without noise
(`0.1+0.2` → `0.3`, `1/3` → `0.333333`); a float with an integral value prints as an int (`48/2` → `24`),
which is how GSM8K writes its calculator results, up to 1e15 (beyond that, Python's repr: `1e+20`).
"""
from __future__ import annotations

import ast
import math
import operator
import time

MAX_EXPR_CHARS = 1000
MAX_INT_BITS = 512  # about 154 decimal digits
MAX_RESULT_DIGITS = 100
_ROUND = 6

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """The expression is outside what the calculator answers."""


def evaluate(expr: str, timeout: float = 1.0) -> str | None:
    """The value of `expr` formatted as text, or None when it is not allowed or has no finite value."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    if not expr:
        return None
    deadline = time.monotonic() + timeout
    try:
        tree = ast.parse(expr, mode="eval")
        value = _eval(tree.body, deadline)
    except (_Refused, SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
    return _format(value)


def _eval(node: ast.AST, deadline: float):
    if time.monotonic() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise _Refused("only int and float literals")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _number(_UNARY[type(node.op)](_number(_eval(node.operand, deadline))))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a = _number(_eval(node.left, deadline))
        b = _number(_eval(node.right, deadline))
        _check_size(type(node.op), a, b)
        return _number(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Call):
        return _count(node)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _number(value):
    """Only finite ints and floats flow between nodes (a str, bool or complex is refused)."""
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _Refused("integer too large")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise _Refused("not finite")
        return value
    raise _Refused(f"{type(value).__name__} is not a number")


def _bits(x) -> float:
    """log2(|x|) bound for an int, 0 for |x| <= 1."""
    return max(abs(x).bit_length(), 1) if type(x) is int else 0.0


def _check_size(op: type, a, b) -> None:
    """Refuse an integer operation whose result would be too large, before computing it."""
    if type(a) is not int or type(b) is not int:
        return  # float arithmetic is constant time; overflow raises or gives inf, refused by _number
    if op is ast.Mult and _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise _Refused("product too large")
    if op is ast.Pow and abs(a) > 1 and b > 0 and b * (abs(a).bit_length() - 1) > MAX_INT_BITS:
        raise _Refused("power too large")


def _count(node: ast.Call) -> int:
    """`'text'.count('x')`, both sides string literals, one positional argument."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count" and isinstance(func.value, ast.Constant)
            and type(func.value.value) is str and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and type(node.args[0].value) is str):
        raise _Refused("the only call allowed is 'text'.count('x')")
    return func.value.value.count(node.args[0].value)


def _format(value) -> str | None:
    if type(value) is int:
        text = str(value)
        return text if len(text.lstrip("-")) <= MAX_RESULT_DIGITS else None
    value = round(value, _ROUND)
    if value == 0:
        return "0"  # also turns -0.0 into 0
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
