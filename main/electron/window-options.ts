// The desktop window's security settings, kept apart from `electron` so tests check them
// under plain Node: an isolated, sandboxed renderer without Node, a strict CSP, and content
// only from the app's own files (served on the strata:// scheme).

/** The scheme the packaged renderer is served on (see main.ts). */
export const APP_ORIGIN = 'strata://app';

/** The page may load only its own scripts, styles and images, and connect nowhere. */
export const CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "font-src 'self'",
  "connect-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
  "object-src 'none'",
].join('; ');

export function windowOptions(preload: string) {
  return {
    width: 1440,
    height: 900,
    minWidth: 960,
    minHeight: 600,
    title: 'Strata',
    show: false,
    backgroundColor: '#0b1120',
    autoHideMenuBar: true,
    webPreferences: {
      preload,
      contextIsolation: true,
      sandbox: true,
      nodeIntegration: false,
      nodeIntegrationInWorker: false,
      nodeIntegrationInSubFrames: false,
      webSecurity: true,
      allowRunningInsecureContent: false,
      webviewTag: false,
      navigateOnDragDrop: false,
      spellcheck: false,
      devTools: process.env.STRATA_DEVTOOLS === '1',
    },
  } as const;
}

/** IPC is answered only for the app's own top frame. */
export function trustedSender(frameUrl: string | undefined, isMainFrame: boolean): boolean {
  return isMainFrame && typeof frameUrl === 'string' && (frameUrl === `${APP_ORIGIN}/` || frameUrl.startsWith(`${APP_ORIGIN}/`));
}
