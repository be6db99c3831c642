"""The edit-shaped task of the speculative-decoding benchmark: 60 lines of Python to repeat with one line changed.

The code is a class in the plain style SmolLM2-135M writes itself (its own answer to "a bank
account with deposit, withdraw, transfer and a transaction history", tidied): given any of
several ordinary 60-line functions (a hand-written order summary, urllib's urljoin,
json's py_scanstring) it repeated 2-8 lines and then wrote its own code or looped, so a
speed-up measured on them would not be the speed-up of copying.
"""

from __future__ import annotations

import difflib

CODE = '''\
class BankAccount:
    """
    A bank account with deposit, withdraw, transfer, and transaction history.
    """
    def __init__(self, account_number, account_type, account_holder):
        """
        Constructor.
        """
        self.account_number = account_number
        self.account_type = account_type
        self.account_holder = account_holder
        self.balance = 0.0
        self.transaction_history = []
        self.is_open = True

    def deposit(self, amount):
        """
        Deposit a specified amount to the account.
        """
        if amount <= 0:
            raise ValueError("Deposit amount must be positive")
        self.balance += amount
        self.transaction_history.append(f"Deposit: {amount} to account number {self.account_number}")

    def withdraw(self, amount):
        """
        Withdraw a specified amount from the account.
        """
        if amount <= 0:
            raise ValueError("Withdrawal amount must be positive")
        if amount > self.balance:
            raise ValueError("Insufficient funds")
        self.balance -= amount
        self.transaction_history.append(f"Withdrawal: {amount} from account number {self.account_number}")

    def transfer(self, other, amount):
        """
        Transfer a specified amount to another account.
        """
        self.withdraw(amount)
        other.deposit(amount)
        self.transaction_history.append(f"Transfer: {amount} to account number {other.account_number}")

    def get_balance(self):
        """
        Returns the current balance of the account.
        """
        return self.balance

    def get_transaction_history(self):
        """
        Returns a list of all transactions made to the account.
        """
        return self.transaction_history

    def __str__(self):
        """
        Returns a short description of the account.
        """
        return f"{self.account_holder}'s {self.account_type} account {self.account_number}: {self.balance:.2f}"
'''

# One edit per request: (old line, new line). Each repetition and each of (c)'s streams takes
# its own, so no two concurrent requests produce the same text.
EDITS = (
    ('raise ValueError("Insufficient funds")', 'raise ValueError("Not enough money in the account")'),
    ('self.balance = 0.0', 'self.balance = 100.0'),
    ('raise ValueError("Deposit amount must be positive")', 'raise ValueError("Only positive amounts can be deposited")'),
    ('return self.balance', 'return round(self.balance, 2)'),
    ('self.transaction_history = []', 'self.transaction_history = list()'),
    ('if amount > self.balance:', 'if amount > self.balance + 100:'),
    ('return self.transaction_history', 'return list(self.transaction_history)'),
    ('other.deposit(amount)', 'other.deposit(amount * 0.99)'),
)
assert len(CODE.splitlines()) == 60 and all(CODE.count(old) == 1 for old, _ in EDITS)


def edit_messages(i: int) -> list[dict]:
    old, new = EDITS[i % len(EDITS)]
    return [{"role": "user", "content": (
        f"```python\n{CODE}```\n\nRewrite this class with one change: replace the line `{old}` with "
        f"`{new}`. Keep every other line exactly as it is and output the whole class.")}]


def expected(i: int) -> str:
    old, new = EDITS[i % len(EDITS)]
    return CODE.replace(old, new)


def copied(i: int, text: str) -> dict:
    """How much of the expected code the answer repeats: lines in order (difflib), whether
    the edit was made, and the first line where it went astray."""
    want = [line.rstrip() for line in expected(i).splitlines()]
    body = text.split("```python\n", 1)[-1] if "```python\n" in text else text.split("```\n", 1)[-1]
    got = [line.rstrip() for line in body.split("```", 1)[0].splitlines()]
    sm = difflib.SequenceMatcher(None, want, got, autojunk=False)
    first = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return {"lines_matching": sum(b.size for b in sm.get_matching_blocks()), "lines_expected": len(want),
            "lines_out": len(got), "first_wrong_line": first + 1 if first < len(want) else None,
            "edit_made": EDITS[i % len(EDITS)][1] in text}
