// `npm start`: the desktop app arrives with the app-shell issue; until then point at what works.
process.stdout.write([
  'Strata: the desktop app (Electron window and browser mode) is not part of this build yet.',
  'The engine and the command line are: try',
  '  node bin/strata.cjs --help',
  '  node bin/strata.cjs info --backing-chain IMAGE.qcow2',
  '',
].join('\n'));
