import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import './styles.css';
import { App } from './App';
import { init } from './lib/store';

createRoot(document.getElementById('root')!).render(<StrictMode><App /></StrictMode>);
void init();
