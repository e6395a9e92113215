"""The allowlisting unpickler and the stand-ins it uses in place of the globals a pickle names."""
