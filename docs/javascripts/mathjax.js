// MathJax configuration, read by assets/mathjax/tex-svg.js (shipped with the site by
// docs/hooks/offline_math.py). Only the elements that pymdownx.arithmatex marks are typeset:
// inline \( ... \) and display \[ ... \].
window.MathJax = {
  tex: {
    inline: [["\\(", "\\)"]],
    display: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
    enableMenu: false,
  },
  svg: { fontCache: "global" },
};

// Material's instant navigation swaps pages without a reload: typeset the new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
