"""A PythonQt-like ``qt`` module built on PySide6.

Slicer's Python sees Qt through PythonQt; this module gives a test the same surface on top of PySide6 (QtCore,
QtGui, QtWidgets and QtUiTools flattened into one module named ``qt``), for the PythonQt behaviours that module
code relies on:

* **Qt properties as attributes**, and a property wins over a same-named method (``button.checked = True``,
  ``lineEdit.text`` is the string, ``widget.height`` an int); attributes defined in Python (instance attributes,
  methods of a Python subclass) win over properties, as in PythonQt, whose wrapper looks in the Python type
  first. ``obj.name`` is the objectName, ``obj.className()`` the C++ class name.
* **Signals by signature string**: ``obj.connect("clicked(bool)", fn)``, ``obj.disconnect(sig, fn)``. As in
  PythonQt (PythonQtSignalTarget::call) a Python function or method receives only as many of the signal's
  arguments as it declares positional parameters (``lambda: ...`` connected to ``clicked(bool)`` is called with
  none); other callables get all of them.
* **Exceptions in slots, timer callbacks, event filters and VTK observers** are printed and swallowed by PythonQt
  and VTK; here they are also passed to ``sys.excepthook`` which the harness replaces to record them, so a test
  fails on them (see ``errors.py``).
* **Modal dialogs never block**: ``exec_()``/``exec()`` of QDialog and QMessageBox and the static QMessageBox /
  QFileDialog / QInputDialog helpers are routed to ``DIALOGS`` (see ``dialogs.py``), which records them and returns
  the test's queued answer.
* ``qt.QUiLoader`` creates these wrapper classes (and the CTK / MRML stand-ins registered with
  ``register_widget_class``) so that widgets loaded from a .ui file behave the same.

Every class of the four PySide6 modules that derives from QObject is exposed as a subclass with the PythonQt
behaviour (``qt.QPushButton`` is a subclass of ``PySide6.QtWidgets.QPushButton``); ``isinstance(x, qt.QWidget)`` is
true for any QWidget, also one created by Qt itself. Value classes (QColor, QIcon, QKeySequence, events) and
enums (``qt.Qt.Key_Escape``, ``qt.QEvent.KeyPress``) are PySide6's own.

Not reproduced (see also the README section): objects Qt creates and hands back without a Python wrapper of
ours (layouts loaded from a .ui file, ``findChild`` results of plain Qt classes, event objects) are plain
PySide6 objects without property-attributes or ``connect(str, fn)``; PythonQt's automatic conversion of
``QVariant``/``QList`` types differs in details (PySide6 returns enums as Python enums, PythonQt as ints);
``connect`` to a signature that does not exist raises here (PythonQt returns False and prints a warning);
PythonQt's ``qt.QObject.connect(sender, sig, receiver, slot)`` four-argument form and decorated slots are not
provided.
"""

import inspect
import sys
import threading
import types

import shiboken6
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

from . import dialogs
from .errors import report_exception

_ShibokenMeta = type(QtCore.QObject)
_PYSIDE_MODULES = (QtCore, QtGui, QtWidgets, QtUiTools)


class PythonQtMeta(_ShibokenMeta):
    """Metaclass of the wrapper classes: ``isinstance(x, qt.QWidget)`` holds for every PySide6 QWidget."""

    def __instancecheck__(cls, obj):
        base = cls.__dict__.get("_pq_base")
        if base is not None:
            return isinstance(obj, base)
        return _ShibokenMeta.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub):
        base = cls.__dict__.get("_pq_base")
        if base is not None:
            return issubclass(sub, base)
        return _ShibokenMeta.__subclasscheck__(cls, sub)


def _is_binding_class(klass):
    """PySide6/Shiboken classes and our generated wrappers: the 'C++ side' in PythonQt's lookup order."""
    return ("_pq_base" in klass.__dict__ or klass is PythonQtObject or klass is object
            or (klass.__module__ or "").startswith(("PySide6", "Shiboken", "shiboken6")))


_python_names = {}  # type -> set of names defined in Python classes of its MRO (they win over Qt properties)


def _python_defined(klass, name):
    names = _python_names.get(klass)
    if names is None:
        names = set()
        for k in klass.__mro__:
            if "_pq_base" in k.__dict__:  # a wrapper class: its own additions (exec_, singleShot)
                names.update(n for n in k.__dict__ if not n.startswith("_"))
            elif not _is_binding_class(k):
                names.update(k.__dict__)
        _python_names[klass] = names
    return name in names


def _meta_property(obj, name):
    try:
        mo = QtCore.QObject.metaObject(obj)
    except (RuntimeError, TypeError):  # not initialized yet, or already deleted
        return None
    index = mo.indexOfProperty(name)
    return mo.property(index) if index >= 0 else None


_reading = threading.local()  # (id(object), property name) pairs whose Qt property is being read in this thread


def _enter_read(obj, name):
    """False when this property of ``obj`` is already being read in this thread: a property that is also a virtual
    method (``sizeHint``) makes C++ ask the binding for a Python override of that method by attribute lookup while the
    property is read. That lookup must find the method, as it does under PythonQt (C++ calls never see properties);
    otherwise the read recurses until Python's stack runs out."""
    pairs = getattr(_reading, "pairs", None)
    if pairs is None:
        pairs = _reading.pairs = set()
    key = (id(obj), name)
    if key in pairs:
        return False
    pairs.add(key)
    return True


def _base_type(value):
    return value.__dict__.get("_pq_base", value) if isinstance(value, type) else value


def _signature_argument_count(signature):
    inner = signature[signature.index("(") + 1:signature.rindex(")")].strip()
    return 0 if not inner else inner.count(",") + 1


def _accepted_argument_count(fn):
    """PythonQt's rule: positional parameter count of a Python function or method, None (all) otherwise."""
    target, bound = fn, False
    if isinstance(fn, types.MethodType):
        target, bound = fn.__func__, True
    if not isinstance(target, types.FunctionType):
        return None
    code = target.__code__
    if code.co_flags & inspect.CO_VARARGS:
        return None
    return code.co_argcount - (1 if bound else 0)


def call_python(fn, args, where=""):
    """Call ``fn`` as PythonQt calls a slot: trimmed arguments, exceptions reported, never raised."""
    n = _accepted_argument_count(fn)
    if n is not None:
        args = args[:n]
    try:
        return fn(*args)
    except Exception:
        report_exception(sys.exc_info(), where or ("slot %r" % (fn,)))
        return None


class _Slot(object):
    __slots__ = ("fn", "signature", "count")

    def __init__(self, fn, signature):
        self.fn = fn
        self.signature = signature
        self.count = _signature_argument_count(signature)

    def __call__(self, *args):
        return call_python(self.fn, tuple(args[:self.count]), "slot of %s" % self.signature)


class PythonQtObject(object):
    """The PythonQt behaviour, mixed into every QObject class of the ``qt`` module."""

    def __getattribute__(self, name):
        if name in _MIXIN_NAMES or (name[:1] != "_" and _python_defined(type(self), name)):
            value = object.__getattribute__(self, name)  # ours and Python subclasses' (normal MRO order)
            if isinstance(value, QtCore.Property):  # a Qt property declared in Python (stand-ins)
                return _meta_property(self, name).read(self)
            return value
        if name[:1] != "_":
            try:
                instance_dict = super().__getattribute__("__dict__")
            except AttributeError:
                instance_dict = {}
            if name in instance_dict:
                return instance_dict[name]
            prop = _meta_property(self, name)
            if prop is not None and _enter_read(self, name):
                try:
                    return prop.read(self)
                finally:
                    _reading.pairs.discard((id(self), name))
            if name == "name":
                return QtCore.QObject.objectName(self)
        # Shiboken's own lookup: it resolves names that are both static and instance methods (QFile.exists)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] != "_" and (not _python_defined(type(self), name)
                                or isinstance(getattr(type(self), name, None), QtCore.Property)):
            prop = _meta_property(self, name)
            if prop is not None:
                if not prop.isWritable() or not prop.write(self, value):
                    raise AttributeError("cannot set Qt property %r of %s to %r" % (name, self.className(), value))
                return
            if name == "name":
                QtCore.QObject.setObjectName(self, value)
                return
        super().__setattr__(name, value)

    def className(self):
        return QtCore.QObject.metaObject(self).className()

    def findChildren(self, *args, **kwargs):
        """``findChildren(qt.QPushButton)`` finds every QPushButton, as in PythonQt (PySide6 compares the
        Python type)."""
        return QtCore.QObject.findChildren(self, *[_base_type(a) for a in args], **kwargs)

    def findChild(self, *args, **kwargs):
        return QtCore.QObject.findChild(self, *[_base_type(a) for a in args], **kwargs)

    def connect(self, signal, fn, *more):
        """``obj.connect("clicked(bool)", fn)`` as in PythonQt."""
        if more or not isinstance(signal, str):
            raise TypeError("only obj.connect('signal(args)', callable) is reproduced")
        signature = self._pq_signature(signal)
        slot = _Slot(fn, signature)
        QtCore.QObject.connect(self, QtCore.SIGNAL(signature), slot)
        self.__dict__.setdefault("_pq_slots", []).append((signature, fn, slot))
        return True

    def disconnect(self, signal=None, fn=None):
        """``obj.disconnect("clicked(bool)", fn)``; without fn, every callable connected to the signal."""
        if signal is None:
            raise TypeError("disconnect() needs a signal signature")
        signature = self._pq_signature(signal)
        slots = self.__dict__.get("_pq_slots", [])
        found = False
        for entry in list(slots):
            sig, f, slot = entry
            if sig == signature and (fn is None or f == fn):
                QtCore.QObject.disconnect(self, QtCore.SIGNAL(signature), slot)
                slots.remove(entry)
                found = True
        return found

    def _pq_signature(self, signal):
        signature = "".join(signal.split())  # Qt's normalized form, for the signatures module code writes
        if QtCore.QObject.metaObject(self).indexOfSignal(signature) < 0:
            raise ValueError("%s has no signal %s (PythonQt would print a warning and return False)"
                             % (self.className(), signal))
        return signature

    def __init_subclass__(cls, **kwargs):
        """Event filters written in Python: exceptions are reported (PythonQt prints them and returns False)."""
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("eventFilter")
        if fn is not None and not getattr(fn, "_pq_wrapped", False):
            def eventFilter(self, obj, event, _fn=fn):
                try:
                    return bool(_fn(self, obj, event))
                except Exception:
                    report_exception(sys.exc_info(), "eventFilter of %s" % type(self).__name__)
                    return False
            eventFilter._pq_wrapped = True
            cls.eventFilter = eventFilter


_MIXIN_NAMES = frozenset(n for n in PythonQtObject.__dict__ if not n.startswith("__"))


def _wrap(base, extra=None):
    namespace = {"_pq_base": base, "__module__": "qt", "__qualname__": base.__name__}
    namespace.update(extra or {})
    return PythonQtMeta(base.__name__, (PythonQtObject, base), namespace)


# --- classes whose behaviour differs from plain PySide6 beyond the mixin

_generation = [0]  # bumped by each harness: timers of an earlier harness never fire in a later one


def new_generation():
    _generation[0] += 1


def _single_shot(*args):
    """``qt.QTimer.singleShot(msec, callable)`` (and ``(msec, receiver, slot)``): the callback is reported like a
    slot when it raises; a bound method of a QObject is dropped with its object (as Qt ties a timer to its
    receiver) and callbacks left from an earlier harness never run."""
    if len(args) == 2 and callable(args[1]):
        msec, fn = args
        generation = _generation[0]
        receiver = getattr(fn, "__self__", None)

        def fire():
            if generation != _generation[0]:
                return
            if isinstance(receiver, QtCore.QObject) and not shiboken6.isValid(receiver):
                return
            call_python(fn, (), "QTimer.singleShot callback")

        if isinstance(receiver, QtCore.QObject):
            QtCore.QTimer.singleShot(int(msec), receiver, fire)
        else:
            QtCore.QTimer.singleShot(int(msec), fire)
        return
    return QtCore.QTimer.singleShot(*args)


def _dialog_exec(self, *args):
    return dialogs.DIALOGS.exec_dialog(self)


def _message_static(icon):
    def show(*args, **kwargs):
        return dialogs.DIALOGS.static_message(icon, args, kwargs)
    return staticmethod(show)


def _file_static(kind):
    def show(*args, **kwargs):
        return dialogs.DIALOGS.static_file(kind, args, kwargs)
    return staticmethod(show)


def _input_static(kind):
    def show(*args, **kwargs):
        return dialogs.DIALOGS.static_input(kind, args, kwargs)
    return staticmethod(show)


_EXTRA = {
    "QTimer": {"singleShot": staticmethod(_single_shot)},
    "QDialog": {"exec_": _dialog_exec, "exec": _dialog_exec},
    "QMessageBox": {"exec_": _dialog_exec, "exec": _dialog_exec,
                    "information": _message_static("information"), "warning": _message_static("warning"),
                    "critical": _message_static("critical"), "question": _message_static("question"),
                    "about": _message_static("about")},
    "QFileDialog": {"exec_": _dialog_exec, "exec": _dialog_exec,
                    "getOpenFileName": _file_static("getOpenFileName"),
                    "getOpenFileNames": _file_static("getOpenFileNames"),
                    "getSaveFileName": _file_static("getSaveFileName"),
                    "getExistingDirectory": _file_static("getExistingDirectory")},
    "QInputDialog": {"exec_": _dialog_exec, "exec": _dialog_exec,
                     "getText": _input_static("getText"), "getInt": _input_static("getInt"),
                     "getDouble": _input_static("getDouble"), "getItem": _input_static("getItem")},
    "QProgressDialog": {"exec_": _dialog_exec, "exec": _dialog_exec},
}
# every other QDialog subclass: exec goes to the recorder too
_DIALOG_BASE = QtWidgets.QDialog


class QUiLoader(QtUiTools.QUiLoader):
    """``qt.QUiLoader``: widgets of a .ui file are created as the ``qt`` module's classes (or the registered
    CTK / MRML stand-ins), so ``slicer.util.loadUI`` returns PythonQt-like widgets. Layouts stay PySide6's."""

    def createWidget(self, className, parent=None, name=""):
        cls = _widget_classes.get(className)
        if cls is None:
            raise RuntimeError("the harness has no class for %r in a .ui file: add a stand-in" % className)
        widget = cls(parent) if parent is not None else cls()
        widget.setObjectName(name)
        return widget


_widget_classes = {}  # .ui class name -> class


def register_widget_class(name, cls):
    """Let ``qt.QUiLoader`` create ``cls`` for ``<widget class="name">`` (CTK and MRML stand-ins)."""
    _widget_classes[name] = cls


def build_qt_module():
    """The ``qt`` module object (built once per process: the wrapper classes are process-wide)."""
    global _QT_MODULE
    if _QT_MODULE is not None:
        return _QT_MODULE
    module = types.ModuleType("qt", "PythonQt-like qt module of the test harness (PySide6 underneath)")
    for source in _PYSIDE_MODULES:
        for name in dir(source):
            if name.startswith("_"):
                continue
            value = getattr(source, name)
            if isinstance(value, type) and issubclass(value, QtCore.QObject) and value is not QtUiTools.QUiLoader:
                extra = dict(_EXTRA.get(name, {}))
                if issubclass(value, _DIALOG_BASE) and "exec_" not in extra:
                    extra.update({"exec_": _dialog_exec, "exec": _dialog_exec})
                value = _wrap(value, extra)
                if issubclass(value, QtWidgets.QWidget):
                    _widget_classes.setdefault(name, value)
            setattr(module, name, value)
    module.QUiLoader = QUiLoader
    module.SIGNAL = QtCore.SIGNAL
    module.SLOT = QtCore.SLOT
    _QT_MODULE = module
    return module


_QT_MODULE = None
