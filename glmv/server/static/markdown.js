// A small, safe Markdown subset for model answers.
//
// Everything is built from DOM nodes and text nodes: model output is never parsed as HTML, so
// `<script>` or `<img onerror=...>` in an answer is shown as the literal text it is.
// Supported: paragraphs, headings (#..######), **bold**, *italic* / _italic_, `inline code`,
// fenced ``` code blocks, bullet and numbered lists, [links](https://...) (http/https only).
"use strict";

(function () {
  const FENCE = /^\s*(```|~~~)\s*([\w+-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  // Inline tokens, earliest match wins: code, link, bold, italic.
  // Emphasis needs non-space text inside; `_` delimiters also need a non-word character outside
  // (so `snake_case` and `window.__name` stay as they are).
  const INLINE = new RegExp([
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
    /\[([^\]\n]+)\]\(([^)\s]+)\)/.source,
    /\*\*([^*\s](?:[^*\n]*?[^*\s])?)\*\*/.source,
    /(?<!\w)__([^_\s](?:[^_\n]*?[^_\s])?)__(?!\w)/.source,
    /\*([^*\s](?:[^*\n]*?[^*\s])?)\*/.source,
    /(?<!\w)_([^_\s](?:[^_\n]*?[^_\s])?)_(?!\w)/.source,
  ].join("|"));

  function el(tag, cls) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    return node;
  }

  function safeUrl(url) {
    try {
      const parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  function inline(text, parent) {
    let rest = text;
    while (rest.length) {
      const m = INLINE.exec(rest);
      if (!m) {
        parent.appendChild(document.createTextNode(rest));
        return;
      }
      if (m.index > 0) parent.appendChild(document.createTextNode(rest.slice(0, m.index)));
      if (m[1] !== undefined) {
        const code = el("code");
        code.textContent = m[2];
        parent.appendChild(code);
      } else if (m[3] !== undefined) {
        const href = safeUrl(m[4]);
        if (href) {
          const a = el("a");
          a.href = href;
          a.target = "_blank";
          a.rel = "noopener noreferrer";
          inline(m[3], a);
          parent.appendChild(a);
        } else {
          parent.appendChild(document.createTextNode(m[0]));
        }
      } else if (m[5] !== undefined || m[6] !== undefined) {
        const b = el("strong");
        inline(m[5] !== undefined ? m[5] : m[6], b);
        parent.appendChild(b);
      } else {
        const i = el("em");
        inline(m[7] !== undefined ? m[7] : m[8], i);
        parent.appendChild(i);
      }
      rest = rest.slice(m.index + m[0].length);
    }
  }

  function paragraph(lines, parent) {
    const p = el("p");
    lines.forEach((line, k) => {
      if (k) p.appendChild(el("br"));
      inline(line, p);
    });
    parent.appendChild(p);
  }

  // text -> DocumentFragment
  function render(text) {
    const frag = document.createDocumentFragment();
    const lines = String(text || "").replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const flush = () => {
      if (para.length) paragraph(para, frag);
      para = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flush();
        const body = [];
        i += 1;
        while (i < lines.length && !new RegExp("^\\s*" + fence[1] + "\\s*$").test(lines[i])) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1; // the closing fence (or the end of an unfinished block while streaming)
        const pre = el("pre");
        const code = el("code");
        if (fence[2]) {
          code.dataset.lang = fence[2];
          pre.dataset.lang = fence[2];
        }
        code.textContent = body.join("\n");
        pre.appendChild(code);
        frag.appendChild(pre);
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        flush();
        const h = el("h" + Math.min(heading[1].length + 2, 6));
        inline(heading[2], h);
        frag.appendChild(h);
        i += 1;
        continue;
      }
      if (BULLET.test(line) || NUMBERED.test(line)) {
        flush();
        const ordered = !BULLET.test(line);
        const list = el(ordered ? "ol" : "ul");
        if (ordered) {
          const start = parseInt(NUMBERED.exec(line)[1], 10);
          if (start !== 1) list.start = start;
        }
        const pattern = ordered ? NUMBERED : BULLET;
        while (i < lines.length && pattern.test(lines[i])) {
          const m = pattern.exec(lines[i]);
          const li = el("li");
          inline(ordered ? m[2] : m[1], li);
          list.appendChild(li);
          i += 1;
        }
        frag.appendChild(list);
        continue;
      }
      if (!line.trim()) {
        flush();
      } else {
        para.push(line);
      }
      i += 1;
    }
    flush();
    return frag;
  }

  window.GlmvMarkdown = { render: render, safeUrl: safeUrl };
})();
