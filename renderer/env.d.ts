// Vite's handling of style imports, for the type checker.
declare module '*.css';
