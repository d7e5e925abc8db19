"""
The python tool of chat conversations: what the engine runs between <|python_start|> and <|python_end|>, whose
result it writes back between <|output_start|> and <|output_end|>.

calculator(expr) evaluates arithmetic by walking the expression's syntax tree (never eval or exec): numbers,
+ - * / // % **, unary signs and parentheses, with bounds on the expression's length, on exponents and on the
size of every intermediate number. One non-arithmetic form is accepted because SpellingBee's conversations use
it: a string literal's count of a string literal, 'strawberry'.count('r'). Names, other calls, attributes,
subscripts and everything else are refused. A refused or failing expression gives None (the model sees no
output), never an exception.
"""
import ast
import math
import operator
import re

MAX_EXPRESSION_CHARS = 256
MAX_EXPONENT = 1024  # |b| in a ** b (the bit bound below keeps integer powers small)
MAX_INT_BITS = 4096  # any intermediate integer

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# "1,234,567" as written in word problems: a comma between a digit and exactly three digits
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class _Refused(Exception):
    pass


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused
    return value


def _string_literal(node):
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        raise _Refused
    return node.value


def _power(base, exponent):
    if abs(exponent) > MAX_EXPONENT:
        raise _Refused
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_INT_BITS:  # refused before the big number is ever built
            raise _Refused
    result = base ** exponent
    if isinstance(result, complex):  # a negative base to a fractional power
        raise _Refused
    return result


def _evaluate(node):
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _number(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _number(_power(left, right))
        return _number(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        return _string_literal(node.func.value).count(_string_literal(node.args[0]))
    raise _Refused


def format_number(value):
    """A result as the tool prints it: whole numbers without ".0" (GSM8K writes 10, not 10.0), others with up
    to 10 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def calculator(expr):
    """The value of an arithmetic expression as a string, or None if it is refused or fails."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    text = _THOUSANDS_COMMA.sub("", expr.strip())
    try:
        tree = ast.parse(text, mode="eval")
        return format_number(_evaluate(tree.body))
    except (_Refused, SyntaxError, ValueError, ArithmeticError, MemoryError, RecursionError):
        return None
