"""The one exception type for bad input, which the command line prints as one line instead of a traceback, and the
warning about input a run goes on without, which it prints as one line too."""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do about it.

    Raised where input enters (the command line, the loaders, the data sets), never deep inside a forward pass;
    a ValueError, so code that already catches those keeps working.
    """


class InputWarning(UserWarning):
    """Input a run skips and goes on without (an unreadable image): the message names it and says why."""
