// Command lines shown to people (plans, fixes): argv joined so that a shell reads it back as
// the same argv.

/** POSIX shell quoting: plain words stay as they are, anything else in single quotes. */
export function shellQuote(arg: string): string {
  if (arg !== '' && /^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

export function commandLine(argv: readonly string[]): string {
  return argv.map(shellQuote).join(' ');
}
